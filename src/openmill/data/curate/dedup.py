"""Global exact and near-duplicate removal over every kept document of every shard.

Documents are numbered in the canonical order (train before valid, then domain, file, line):
in every duplicate group the lowest number is kept, so the choice is deterministic and a valid
document that duplicates a train document is the one that goes (or is only counted, per config).

Exact: equal 64-bit hash of the whitespace-collapsed normalized text.
Near: MinHash-LSH candidates (any equal band key), confirmed by the true Jaccard similarity of
the two shingle sets (`verify: exact`), by the fraction of equal signature values (`signature`),
or not at all (`none`, SlimPajama's choice); confirmed pairs are joined by union-find and each
group keeps its lowest-numbered member. Memory: (n, bands) uint64 keys plus the candidate pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from openmill.data.curate.config import DedupConfig

EXACT, NEAR, VALID_IN_TRAIN = 1, 2, 3
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", VALID_IN_TRAIN: "valid_duplicates_train"}
_STAR_ABOVE = 64  # larger LSH buckets are linked to their first member only (quadratic otherwise)


@dataclass
class DedupResult:
    reason: np.ndarray  # (n,) uint8: 0 kept, else EXACT / NEAR / VALID_IN_TRAIN
    duplicate_of: np.ndarray  # (n,) int64: the kept document of the group, -1 if none
    contaminated_kept: int  # valid docs that duplicate train but were kept (valid_duplicates_of_train: count)
    candidate_pairs: int
    confirmed_pairs: int


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root: the kept document
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def _bucket_pairs(keys: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """(m, 2) index pairs (i < j) of alive documents sharing a key."""
    idx = np.flatnonzero(alive)
    if len(idx) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    k = keys[idx]
    order = np.argsort(k, kind="stable")
    k, idx = k[order], idx[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(k)]]))
    pairs = []
    big = sizes >= 2
    for s, size in zip(starts[big], sizes[big]):
        members = idx[s : s + size]  # ascending within a run (stable sort of ascending idx)
        if size > _STAR_ABOVE:
            pairs.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
        else:
            i, j = np.triu_indices(size, k=1)
            pairs.append(np.stack([members[i], members[j]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def deduplicate(
    exact_hashes: np.ndarray,
    band_keys: np.ndarray,
    split_is_valid: np.ndarray,
    domain_ids: np.ndarray,
    cfg: DedupConfig,
    similarity: Callable[[np.ndarray], np.ndarray] | None = None,
) -> DedupResult:
    """`similarity(pairs) -> (m,) float` scores candidate pairs when cfg.verify is not "none".

    All arrays are indexed by the canonical document number; `band_keys` is (n, bands).
    """
    n = len(exact_hashes)
    group = np.full(n, -1, dtype=np.int64)  # kept representative of each dropped doc
    kind = np.zeros(n, dtype=np.uint8)
    scope = domain_ids.astype(np.uint64) if cfg.scope == "domain" else np.zeros(n, dtype=np.uint64)

    if cfg.exact and n:
        order = np.lexsort((np.arange(n), exact_hashes, scope))
        h, s = exact_hashes[order], scope[order]
        first = np.concatenate([[True], (h[1:] != h[:-1]) | (s[1:] != s[:-1])])
        rep = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
        dup = order[~first]
        group[dup] = rep[~first]
        kind[dup] = EXACT

    candidates = confirmed = 0
    if cfg.near and n:
        alive = kind == 0
        pairs = []
        for b in range(band_keys.shape[1]):
            key = band_keys[:, b] ^ (scope * np.uint64(0x9E3779B97F4A7C15))
            pairs.append(_bucket_pairs(key, alive))
        pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)
        candidates = len(pairs)
        if len(pairs) and cfg.verify != "none":
            pairs = pairs[similarity(pairs) >= cfg.threshold]
        confirmed = len(pairs)
        uf = _UnionFind(n)
        for i, j in pairs:
            uf.union(int(i), int(j))
        for i in np.unique(pairs):
            root = uf.find(int(i))
            if root != i:
                group[i] = root
                kind[i] = NEAR
        # An exact duplicate's representative may itself be a near duplicate of an earlier document:
        # point it at the document its group keeps.
        exact = np.flatnonzero(kind == EXACT)
        merged = exact[np.isin(group[exact], pairs)]
        group[merged] = [uf.find(int(r)) for r in group[merged]]

    contaminated_kept = 0
    leaked = (kind > 0) & split_is_valid & ~split_is_valid[np.maximum(group, 0)]
    if cfg.valid_duplicates_of_train == "drop":
        kind[leaked] = VALID_IN_TRAIN
    else:
        contaminated_kept = int(leaked.sum())
        kind[leaked] = 0
        group[leaked] = -1
    return DedupResult(kind, group, contaminated_kept, candidates, confirmed)
