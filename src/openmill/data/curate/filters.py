"""Filter protocol and the length filter.

A filter is a pure predicate over a `DocView`: it returns True to keep the document or
(False, "slug") to drop it, the slug naming the rule that fired. It never reads files, counts or
writes rejects: the stage does that for every filter alike. An editor (C4 lines, PII masking)
returns the new text instead, or (False, "slug") when nothing worth keeping is left.
"""

from __future__ import annotations

from typing import Literal, Protocol, Union

from openmill.data.curate.config import LengthConfig
from openmill.data.curate.doc import DocView

Verdict = Union[Literal[True], tuple[Literal[False], str]]


class Filter(Protocol):
    name: str

    def __call__(self, doc: DocView) -> Verdict: ...


class Editor(Protocol):
    name: str

    def __call__(self, doc: DocView) -> str | tuple[Literal[False], str]: ...


class LengthFilter:
    name = "length"

    def __init__(self, cfg: LengthConfig):
        self.cfg = cfg

    def __call__(self, doc: DocView) -> Verdict:
        c = self.cfg
        if doc.chars < c.min_chars:
            return False, "chars_below_min"
        if doc.chars > c.max_chars:
            return False, "chars_above_max"
        if doc.words < c.min_words:
            return False, "words_below_min"
        if doc.words > c.max_words:
            return False, "words_above_max"
        return True
