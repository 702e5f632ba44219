"""Gopher repetition rules (Rae et al. 2021, appendix A.1.1, table A1), vectorised with numpy.

Per document: one hash per token (shared with dedup), then for each n a rolling n-gram hash;
duplicate detection is `np.unique` / first-occurrence masks instead of Python dicts of tuples,
so the ten n-gram rules cost a few array passes. In CJK text tokens are characters and the
config's `cjk_` tables (n in characters) apply instead of the word tables.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from openmill.data.curate.config import RepetitionConfig
from openmill.data.curate.doc import DocView
from openmill.data.curate.filters import Verdict
from openmill.data.curate.text import ngram_hashes


def duplicate_fractions(pieces: list[str]) -> tuple[float, float]:
    """(fraction of pieces that repeat an earlier one, fraction of their characters)."""
    if not pieces:
        return 0.0, 0.0
    counts = Counter(pieces)
    dup = sum(c - 1 for c in counts.values())
    dup_chars = sum(len(p) * (c - 1) for p, c in counts.items())
    total_chars = sum(len(p) for p in pieces)
    return dup / len(pieces), dup_chars / max(total_chars, 1)


def top_ngram_chars_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Max over repeated n-grams of count x characters, over all word characters.

    (Gopher takes "the most common" n-gram; among equally common ones we take the longest, so the
    value does not depend on which of the tied n-grams a dict happens to return first.)
    """
    grams = ngram_hashes(hashes, n)
    total = int(lengths.sum())
    if len(grams) == 0 or total == 0:
        return 0.0
    _, first, counts = np.unique(grams, return_index=True, return_counts=True)
    cs = np.concatenate([[0], np.cumsum(lengths)])
    chars = cs[first + n] - cs[first]
    score = np.where(counts >= 2, counts * chars, 0)
    return int(score.max()) / total


def duplicated_ngram_chars_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters of the words covered by any repeat occurrence (not the first) of an n-gram, over all."""
    grams = ngram_hashes(hashes, n)
    total = int(lengths.sum())
    if len(grams) < 2 or total == 0:
        return 0.0
    _, first = np.unique(grams, return_index=True)
    repeat = np.ones(len(grams), dtype=bool)
    repeat[first] = False
    if not repeat.any():
        return 0.0
    # word i is covered when some repeat n-gram starts in [i - n + 1, i]: a length-n window sum
    starts = np.concatenate([[0], np.cumsum(repeat)])
    idx = np.arange(len(hashes))
    covered = starts[np.minimum(idx + 1, len(grams))] - starts[np.maximum(idx - n + 1, 0).clip(max=len(grams))] > 0
    return int(lengths[covered].sum()) / total


class GopherRepetitionFilter:
    name = "repetition"

    def __init__(self, cfg: RepetitionConfig):
        self.cfg = cfg

    def __call__(self, doc: DocView) -> Verdict:
        c = self.cfg
        lines_frac, line_chars = duplicate_fractions(doc.nonempty_lines)
        doc.duplicate_lines_fraction = lines_frac
        if lines_frac > c.max_duplicate_lines_fraction:
            return False, "duplicate_lines_fraction_above_max"
        if line_chars > c.max_duplicate_line_chars_fraction:
            return False, "duplicate_line_chars_fraction_above_max"
        para_frac, para_chars = duplicate_fractions(doc.paragraphs)
        if para_frac > c.max_duplicate_paragraphs_fraction:
            return False, "duplicate_paragraphs_fraction_above_max"
        if para_chars > c.max_duplicate_paragraph_chars_fraction:
            return False, "duplicate_paragraph_chars_fraction_above_max"
        hashes, lengths = doc.token_hashes, doc.token_lengths
        cjk = doc.is_cjk
        unit = "char" if cjk else ""
        top = c.cjk_max_top_ngram_chars_fraction if cjk else c.max_top_ngram_chars_fraction
        for i, (n, limit) in enumerate(sorted(top.items())):
            frac = top_ngram_chars_fraction(hashes, lengths, n)
            if i == 0:
                doc.top_ngram_chars_fraction = frac
            if frac > limit:
                return False, f"top_{n}{unit}gram_chars_fraction_above_max"
        dup = c.cjk_max_duplicated_ngram_chars_fraction if cjk else c.max_duplicated_ngram_chars_fraction
        for i, (n, limit) in enumerate(sorted(dup.items())):
            frac = duplicated_ngram_chars_fraction(hashes, lengths, n)
            if i == 0:
                doc.duplicated_ngram_chars_fraction = frac
            if frac > limit:
                return False, f"duplicated_{n}{unit}gram_chars_fraction_above_max"
        return True
