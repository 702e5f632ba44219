"""`DocView`: one document's text plus the statistics filters read, each computed once, on first use.

Filters are pure predicates over a DocView; sharing it means the text is tokenized once per
document however many rules look at its words. The values cached here are also the "signals"
the report histograms.
"""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np

from openmill.data.curate.text import CJK_RE, token_hashes, tokens

_PARAGRAPH_RE = re.compile(r"\n\s*\n")

# Cached numbers recorded per document for the report (only those some filter computed).
SIGNALS = (
    "chars",
    "words",
    "cjk_share",
    "mean_word_length",
    "symbol_to_word_ratio",
    "stop_words",
    "alpha_words_fraction",
    "duplicate_lines_fraction",
    "top_ngram_chars_fraction",  # the smallest n of the table that applies
    "duplicated_ngram_chars_fraction",
    "language_score",
    "alphanumeric_fraction",
)


class DocView:
    def __init__(self, text: str, cjk_chars_per_word: float = 1.5):
        self.text = text
        self.cjk_chars_per_word = cjk_chars_per_word

    def signals(self) -> dict[str, float]:
        return {k: float(self.__dict__[k]) for k in SIGNALS if k in self.__dict__}

    @cached_property
    def chars(self) -> int:
        return len(self.text)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    @cached_property
    def nonempty_lines(self) -> list[str]:
        return [s for s in (line.strip() for line in self.lines) if s]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for s in (p.strip() for p in _PARAGRAPH_RE.split(self.text)) if s]

    @cached_property
    def tokens(self) -> list[str]:
        return tokens(self.text)

    @cached_property
    def n_cjk(self) -> int:
        return len(CJK_RE.findall(self.text))

    @cached_property
    def cjk_share(self) -> float:
        """Fraction of tokens that are CJK characters."""
        return self.n_cjk / len(self.tokens) if self.tokens else 0.0

    @property
    def is_cjk(self) -> bool:
        return self.cjk_share >= 0.5

    @cached_property
    def words(self) -> float:
        """CJK-aware word count: other words + CJK characters / cjk_chars_per_word."""
        return (len(self.tokens) - self.n_cjk) + self.n_cjk / self.cjk_chars_per_word

    @cached_property
    def token_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.tokens), dtype=np.int64, count=len(self.tokens))

    @cached_property
    def token_hashes(self) -> np.ndarray:
        return token_hashes(self.tokens)
