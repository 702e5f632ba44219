"""Serving openmill models: an OpenAI-compatible HTTP server and a terminal chat, both thin over
the generation engine (openmill.generate). See docs/inference.md."""
