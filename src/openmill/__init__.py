"""openmill: raw text to a released, evaluated, fully open language model."""

__version__ = "0.1.0"
