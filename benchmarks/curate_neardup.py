"""Near-duplicate detection quality on planted near-duplicates, English and Chinese, at Jaccard 0.8.

    .venv/bin/python benchmarks/curate_neardup.py [--bases 600 --variants 400]

Corpus per language: real documents from ../shared/data (English books, ~4 KB; Chinese laws and
CMRC contexts), with pre-existing near-duplicates among them removed (exact all-pairs Jaccard <
0.5), plus one edited copy of `--variants` of them: a fraction p ~ U(0, 0.07) of the tokens
replaced, deleted or inserted (60/20/20), which spreads the true Jaccard over ~0.5-1.0.
Truth: a (document, copy) pair is a duplicate when its true shingle Jaccard (the config's
shingling: word 5-grams, CJK character 5-grams) is >= 0.8. Prediction: both in the same dedup
group, through the stage's own functions (MinHasher, band_keys, deduplicate) with the default
config. Any same-group pair that is not a true duplicate counts against precision.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from datetime import date

import curate_data as data
import numpy as np

from openmill.data.curate.config import DedupConfig
from openmill.data.curate.dedup import deduplicate
from openmill.data.curate.doc import DocView
from openmill.data.curate.minhash import MinHasher, band_keys, jaccard, shingles
from openmill.data.curate.shards import exact_hash
from openmill.data.curate.text import TOKEN_RE


def edit(text: str, p: float, vocab: list[str], rng: random.Random) -> str:
    toks = list(TOKEN_RE.finditer(text))
    out, last = [], 0
    for m in toks:
        r = rng.random()
        if r >= p:
            continue
        out.append(text[last : m.start()])
        kind = rng.random()
        if kind < 0.6:  # replace
            out.append(rng.choice(vocab))
        elif kind < 0.8:  # delete
            pass
        else:  # insert before
            out.append(rng.choice(vocab) + (" " if m.group()[0].isascii() else "") + m.group())
        last = m.end()
    return "".join(out + [text[last:]])


def distinct(docs: list[str], cfg: DedupConfig, limit: float = 0.5) -> list[str]:
    keep, shs = [], []
    for d in docs:
        s = shingles(DocView(d), cfg.shingle_words, cfg.shingle_cjk_chars)
        if len(s) >= 50 and all(jaccard(s, o) < limit for o in shs):
            keep.append(d)
            shs.append(s)
    return keep


def evaluate(bases: list[str], n_variants: int, cfg: DedupConfig, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = [t for d in bases[:100] for t in TOKEN_RE.findall(d)]
    variants = [edit(bases[i], rng.uniform(0, 0.07), vocab, rng) for i in range(n_variants)]
    texts = bases + variants
    sh = [shingles(DocView(t), cfg.shingle_words, cfg.shingle_cjk_chars) for t in texts]
    true_j = np.array([jaccard(sh[i], sh[len(bases) + i]) for i in range(n_variants)])
    hasher = MinHasher(cfg.num_perm, seed=1337)
    t = time.process_time()
    sigs = np.stack([hasher.signature(s) for s in sh])
    t_sig = time.process_time() - t
    exact = np.array([exact_hash(x) for x in texts], dtype=np.uint64)
    n = len(texts)
    results = {}
    for verify in ("exact", "signature", "none"):
        c = cfg.model_copy(update={"verify": verify})

        def score(pairs, verify=verify):
            if verify == "exact":
                return np.array([jaccard(sh[i], sh[j]) for i, j in pairs])
            return np.array([np.mean(sigs[i] == sigs[j]) for i, j in pairs])

        t = time.process_time()
        res = deduplicate(
            exact, band_keys(sigs, c.bands, c.rows), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), c, score
        )
        t_dedup = time.process_time() - t
        rep = np.where(res.reason > 0, res.duplicate_of, np.arange(n))
        # every same-group pair is a predicted duplicate
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rep):
            groups.setdefault(int(r), []).append(i)
        predicted = {(a, b) for g in groups.values() for ai, a in enumerate(g) for b in g[ai + 1 :]}
        truth = {(i, len(bases) + i) for i in range(n_variants) if true_j[i] >= cfg.threshold}
        tp = len(predicted & truth)
        buckets = {}
        for lo, hi in ((0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)):
            idx = [i for i in range(n_variants) if lo <= true_j[i] < hi]
            found = sum((i, len(bases) + i) in predicted for i in idx)
            buckets[f"[{lo:.2f},{min(hi, 1):.2f})"] = (found, len(idx))
        results[verify] = {
            "recall": tp / max(len(truth), 1),
            "precision": tp / max(len(predicted), 1),
            "predicted": len(predicted),
            "true": len(truth),
            "buckets": buckets,
            "dedup_s": t_dedup,
            "candidates": res.candidate_pairs,
        }
    results["signature_docs_per_s"] = n / t_sig
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bases", type=int, default=600)
    ap.add_argument("--variants", type=int, default=400)
    args = ap.parse_args()
    cfg = DedupConfig()
    corpora = {
        "en": data.sample(data.english_books(4000), args.bases * 2, 0),
        "zh": data.sample(data.chinese_laws(3000), args.bases, 0) + data.sample(data.cmrc_contexts(), args.bases, 0),
    }
    print(f"# {date.today()} {platform.machine()} python {platform.python_version()}")
    print(
        f"dedup config: shingles {cfg.shingle_words} words / {cfg.shingle_cjk_chars} CJK chars, "
        f"{cfg.num_perm} permutations, {cfg.bands} bands x {cfg.rows} rows, threshold {cfg.threshold}\n"
    )
    print("| lang | verify | true pairs (J>=0.8) | predicted | recall | precision | found by true J | LSH candidates |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for lang, docs in corpora.items():
        bases = data.sample(distinct(docs, cfg), args.bases, 1)
        r = evaluate(bases, min(args.variants, len(bases)), cfg)
        for verify in ("exact", "signature", "none"):
            x = r[verify]
            b = ", ".join(f"{k} {f}/{t}" for k, (f, t) in x["buckets"].items())
            print(
                f"| {lang} | {verify} | {x['true']} | {x['predicted']} | {x['recall']:.3f} | {x['precision']:.3f} | {b} | {x['candidates']} |"
            )


if __name__ == "__main__":
    main()
