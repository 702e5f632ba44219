"""Text primitives shared by filters and dedup: normalization, CJK-aware words, stable token hashes.

No segmenter: a CJK character is one token (Chinese has no spaces; a dictionary segmenter such as
jieba costs ~10x the whole filter chain), a run of other letters/digits is one word. Counts that
must compare across scripts divide CJK characters by a chars-per-word factor instead.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from functools import lru_cache

import numpy as np

from openmill.data.curate.config import NormalizeConfig

# Han (BMP + extension blocks + compatibility) and Japanese kana: scripts written without spaces.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
CJK_RE = re.compile(f"[{_CJK}]")
TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")  # one CJK char, or a run of other word characters

_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_WS_RE = re.compile(r"[ \t\u3000]+\n")
_BLANK_RUN_RE = re.compile(r"\n{4,}")


@lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC  # opencc-python-reimplemented: pure Python, tables in the wheel

    return OpenCC("t2s")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    """Unicode form, whitespace clean-up, optional traditional -> simplified Chinese; idempotent."""
    if cfg.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        # Before composing: a control character between a letter and its accent would keep them
        # apart until a second pass, and normalize would not be idempotent.
        text = _CONTROL_RE.sub("", text)
    if cfg.unicode != "none":
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.whitespace:
        text = _TRAILING_WS_RE.sub("\n", text + "\n")
        text = _BLANK_RUN_RE.sub("\n\n\n", text).strip("\n")
        text = text.rstrip()
    if cfg.traditional_to_simplified and CJK_RE.search(text):
        text = _t2s().convert(text)
    return text


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def is_cjk_char(ch: str) -> bool:
    return CJK_RE.match(ch) is not None


def token_hashes(toks: list[str]) -> np.ndarray:
    """Stable 32-bit hash (crc32 of the casefolded UTF-8) of each token, as uint64; same in every process.

    Python's hash() is salted per process, so it would give different shingles in different workers.
    """
    if not toks:
        return np.zeros(0, dtype=np.uint64)
    joined = "\x00".join(toks).lower().encode("utf-8").split(b"\x00")
    return np.fromiter(map(zlib.crc32, joined), dtype=np.uint64, count=len(joined))


MIX1 = np.uint64(0x9E3779B97F4A7C15)
MIX2 = np.uint64(0xBF58476D1CE4E5B9)


def ngram_hashes(tok_hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every n-gram of consecutive tokens: (len - n + 1,) uint64; empty when too short.

    Polynomial combination then a splitmix-style finaliser: order-sensitive, cheap, vectorised.
    """
    m = len(tok_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = tok_hashes[:m].copy()
        for k in range(1, n):
            h = h * MIX1 + tok_hashes[k : k + m]
        h ^= h >> np.uint64(31)
        h *= MIX2
        h ^= h >> np.uint64(29)
    return h
