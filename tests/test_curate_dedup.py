"""MinHash estimates Jaccard; LSH + verification finds the planted pairs; the kept document is deterministic."""

import numpy as np
import pytest

from openmill.data.curate.config import DedupConfig
from openmill.data.curate.dedup import EXACT, NEAR, VALID_IN_TRAIN, deduplicate
from openmill.data.curate.doc import DocView
from openmill.data.curate.minhash import MinHasher, band_keys, jaccard, shingles


def _words(rng, n):
    return [f"w{int(x)}" for x in rng.integers(0, 5000, n)]


def test_signature_estimates_jaccard():
    rng = np.random.default_rng(0)
    hasher = MinHasher(256, seed=1)
    errors = []
    for keep in (0.95, 0.8, 0.5, 0.2):
        a = _words(rng, 400)
        b = [w if rng.random() < keep else f"x{i}" for i, w in enumerate(a)]
        sa, sb = (shingles(DocView(" ".join(x)), 3, 3) for x in (a, b))
        true = jaccard(sa, sb)
        est = float(np.mean(hasher.signature(sa) == hasher.signature(sb)))
        errors.append(abs(est - true))
    assert max(errors) < 0.1  # std of the estimate is sqrt(J(1-J)/256) <= 0.031


def test_minhash_is_deterministic_across_instances():
    sh = shingles(DocView("the same text in two processes gives the same signature"), 2, 2)
    assert np.array_equal(MinHasher(64, 7).signature(sh), MinHasher(64, 7).signature(sh))
    assert not np.array_equal(MinHasher(64, 7).signature(sh), MinHasher(64, 8).signature(sh))


def test_cjk_shingles_are_characters():
    doc = DocView("中华人民共和国")
    assert doc.is_cjk and len(shingles(doc, 5, 2)) == 6  # 7 characters -> 6 bigrams
    assert len(shingles(DocView("one two three four"), 2, 5)) == 3


def _index(texts, cfg: DedupConfig, seed=0):
    hasher = MinHasher(cfg.num_perm, seed)
    sh = [shingles(DocView(t), cfg.shingle_words, cfg.shingle_cjk_chars) for t in texts]
    sigs = np.stack([hasher.signature(s) for s in sh])
    exact = np.array([hash(" ".join(t.split())) & 0xFFFFFFFFFFFF for t in texts], dtype=np.uint64)

    def sim(pairs):
        return np.array([jaccard(sh[i], sh[j]) for i, j in pairs])

    return exact, band_keys(sigs, cfg.bands, cfg.rows), sim


def test_deduplicate_exact_near_and_contamination():
    rng = np.random.default_rng(3)
    base = [" ".join(_words(rng, 300)) for _ in range(4)]
    near = base[1].split()
    near[10:14] = ["changed", "words", "right", "here"]
    texts = [base[0], base[1], base[0], " ".join(near), base[2], base[3], base[2]]
    valid = np.array([False, False, False, False, False, True, True])
    cfg = DedupConfig()
    exact, bands, sim = _index(texts, cfg)
    res = deduplicate(exact, bands, valid, np.zeros(len(texts), dtype=np.int64), cfg, sim)
    assert res.reason.tolist() == [0, 0, EXACT, NEAR, 0, 0, VALID_IN_TRAIN]
    assert res.duplicate_of.tolist() == [-1, -1, 0, 1, -1, -1, 4]

    counted = deduplicate(
        exact,
        bands,
        valid,
        np.zeros(len(texts), dtype=np.int64),
        cfg.model_copy(update={"valid_duplicates_of_train": "count"}),
        sim,
    )
    assert counted.reason.tolist() == [0, 0, EXACT, NEAR, 0, 0, 0] and counted.contaminated_kept == 1


def test_an_exact_copy_of_a_near_duplicate_points_at_the_kept_document():
    rng = np.random.default_rng(5)
    train = " ".join(_words(rng, 300))
    near = train.split()
    near[10:14] = ["changed", "words", "right", "here"]
    near = " ".join(near)
    texts = [train, near, near]  # 0 train; 1 valid, a near copy of 0; 2 valid, an exact copy of 1
    valid = np.array([False, True, True])
    cfg = DedupConfig()
    exact, bands, sim = _index(texts, cfg)
    res = deduplicate(exact, bands, valid, np.zeros(3, dtype=np.int64), cfg, sim)
    # Both valid documents are copies of train text: neither may stay as held-out data.
    assert res.duplicate_of.tolist() == [-1, 0, 0]
    assert res.reason.tolist() == [0, VALID_IN_TRAIN, VALID_IN_TRAIN]


def test_texts_without_words_are_not_near_duplicates():
    assert jaccard(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)) == 0.0


def test_scope_domain_keeps_cross_domain_copies():
    texts = ["a shared boilerplate text that both domains contain word for word"] * 2
    cfg = DedupConfig(scope="domain")
    exact, bands, sim = _index(texts, cfg)
    res = deduplicate(exact, bands, np.zeros(2, dtype=bool), np.array([0, 1]), cfg, sim)
    assert res.reason.tolist() == [0, 0]
    res = deduplicate(exact, bands, np.zeros(2, dtype=bool), np.array([0, 1]), DedupConfig(), sim)
    assert res.reason.tolist() == [0, EXACT]


@pytest.mark.parametrize("verify", ["exact", "signature", "none"])
def test_verification_modes_reject_or_accept_below_threshold(verify):
    rng = np.random.default_rng(5)
    a = _words(rng, 400)
    b = list(a)
    for i in range(0, 400, 9):  # ~11% of words changed: 5-gram Jaccard ~0.37, far below 0.8
        b[i] = f"new{i}"
    cfg = DedupConfig(verify=verify, bands=40, rows=1, num_perm=40)  # rows=1: nearly every pair is a candidate
    exact, bands, sim = _index([" ".join(a), " ".join(b)], cfg)
    sigs = np.stack([MinHasher(cfg.num_perm, 0).signature(shingles(DocView(" ".join(x)), 5, 5)) for x in (a, b)])
    score = sim if verify == "exact" else (lambda pairs: np.array([np.mean(sigs[i] == sigs[j]) for i, j in pairs]))
    res = deduplicate(exact, bands, np.zeros(2, dtype=bool), np.zeros(2, dtype=np.int64), cfg, score)
    assert res.candidate_pairs == 1
    assert res.reason.tolist() == ([0, NEAR] if verify == "none" else [0, 0])
