"""Vectorised MinHash and LSH band keys.

Shingles are n-grams of tokens (words; characters in CJK text), hashed to 64 bits (text.py).
Each of `num_perm` hash functions is multiply-add-shift on the shingle folded to 32 bits,
h_i(x) = (a_i * x + b_i) mod 2^64 >> 32 with random odd a_i (Dietzfelbinger 1996), so a
signature is one (shingles x num_perm) uint64 product and a column minimum.
Cost: ~num_perm multiply-adds per shingle; a 4 KB English document (~700 shingles) at 128
permutations is ~90k operations, well under a millisecond.
"""

from __future__ import annotations

import numpy as np

from openmill.data.curate.doc import DocView
from openmill.data.curate.text import MIX1, MIX2, ngram_hashes

_BLOCK = 8192  # shingles per product block: bounds memory at _BLOCK * num_perm * 8 bytes


def shingle_size(doc: DocView, words: int, cjk_chars: int) -> int:
    return cjk_chars if doc.is_cjk else words


def shingles(doc: DocView, words: int, cjk_chars: int) -> np.ndarray:
    """Sorted unique 64-bit n-gram hashes; a document shorter than n is one shingle of all its tokens."""
    h = doc.token_hashes
    n = min(shingle_size(doc, words, cjk_chars), len(h))
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(ngram_hashes(h, n))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle arrays."""
    if len(a) == 0 or len(b) == 0:  # a text with no words (emoji, punctuation) is nobody's near copy
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    def __init__(self, num_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, sh: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32 minimum hash values; all 0xFFFFFFFF for an empty shingle set."""
        out = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        if len(sh) == 0:
            return out.astype(np.uint32)
        x = (sh ^ (sh >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        with np.errstate(over="ignore"):
            for i in range(0, len(x), _BLOCK):
                block = x[i : i + _BLOCK, None] * self.a[None, :] + self.b[None, :]
                np.minimum(out, (block >> np.uint64(32)).min(axis=0), out=out)
        return out.astype(np.uint32)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, num_perm) uint32 signatures -> (n, bands) uint64 keys; equal key = equal band (up to 2^-64)."""
    n = signatures.shape[0]
    s = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros((n, bands), dtype=np.uint64)
        for r in range(rows):
            h = h * MIX1 + s[:, :, r] + np.uint64(1)
        h ^= h >> np.uint64(31)
        h *= MIX2
        h ^= h >> np.uint64(29)
    return h
