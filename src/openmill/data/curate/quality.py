"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A.1.1), Chinese-aware.

Differences from the English original, each because Chinese has no spaces:
- words are CJK-aware (see text.py), so the word-count rule (in LengthFilter) means the same;
- mean word length is over non-CJK words and is skipped when CJK characters are most tokens
  (a Han character is one token, and its "length" of 1 says nothing about quality);
- the stop-word rule uses a Chinese list for CJK text (的 了 是 在 和 ... instead of the/and/of).
"""

from __future__ import annotations

from openmill.data.curate.config import QualityConfig
from openmill.data.curate.doc import DocView
from openmill.data.curate.filters import Verdict
from openmill.data.curate.text import is_cjk_char

BULLETS = ("•", "●", "○", "■", "□", "▪", "◦", "‣", "⁃", "–", "-", "*", "·")
ELLIPSES = ("...", "…")


def _mean_word_length(doc: DocView) -> float:
    latin = doc.token_lengths[[not is_cjk_char(t[0]) for t in doc.tokens]] if doc.n_cjk else doc.token_lengths
    return float(latin.mean()) if len(latin) else 0.0


def _alpha_words_fraction(doc: DocView) -> float:
    # A token is a run of word characters (or one CJK character): it holds a letter unless all digits.
    if not doc.tokens:
        return 0.0
    return 1.0 - sum(map(str.isdigit, doc.tokens)) / len(doc.tokens)


class GopherQualityFilter:
    name = "quality"

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.stop_en = frozenset(w.lower() for w in cfg.stop_words_en)
        self.stop_zh = frozenset(cfg.stop_words_zh)

    def __call__(self, doc: DocView) -> Verdict:
        c = self.cfg
        words = max(doc.words, 1.0)
        if not doc.is_cjk:
            doc.mean_word_length = _mean_word_length(doc)
            if doc.mean_word_length < c.min_mean_word_length:
                return False, "mean_word_length_below_min"
            if doc.mean_word_length > c.max_mean_word_length:
                return False, "mean_word_length_above_max"
        text = doc.text
        doc.symbol_to_word_ratio = (text.count("#") + text.count("...") + text.count("…")) / words
        if doc.symbol_to_word_ratio > c.max_symbol_to_word_ratio:
            return False, "symbol_to_word_ratio_above_max"
        lines = doc.nonempty_lines
        if lines:
            if sum(1 for s in lines if s.startswith(BULLETS)) / len(lines) > c.max_bullet_lines_fraction:
                return False, "bullet_lines_fraction_above_max"
            if sum(1 for s in lines if s.endswith(ELLIPSES)) / len(lines) > c.max_ellipsis_lines_fraction:
                return False, "ellipsis_lines_fraction_above_max"
        doc.alpha_words_fraction = _alpha_words_fraction(doc)
        if doc.alpha_words_fraction < c.min_alpha_words_fraction:
            return False, "alpha_words_fraction_below_min"
        if doc.is_cjk:
            doc.stop_words = sum(1 for w in self.stop_zh if w in text)
        else:
            doc.stop_words = len(self.stop_en.intersection(t.lower() for t in doc.tokens))
        if doc.stop_words < c.min_stop_words:
            return False, "stop_words_below_min"
        return True
