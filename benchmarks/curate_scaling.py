"""Whole-stage throughput (wall clock) with 1 and 2 worker processes, on one single input file.

    .venv/bin/python benchmarks/curate_scaling.py [--n 3000]

One .jsonl file of `--n` English Gutenberg chunks (~4 KB) plus a tiny valid file; the default
rules (language ID on), no plots. The local executor reads in the main process and hands
`docs_per_shard` chunks to the workers, so one file still spreads over the cores. Wall-clock
numbers depend on what else the machine runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import curate_data as data

from openmill.config import Recipe
from openmill.data.curate.stage import run_curate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    docs = data.sample(data.english_books(4000), args.n)
    tmp = Path(tempfile.mkdtemp(prefix="curate_scaling_"))
    try:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as f:
            for i, t in enumerate(docs):
                f.write(json.dumps({"id": str(i), "text": t}) + "\n")
        (tmp / "valid.jsonl").write_text(json.dumps({"text": docs[0][:500] + " valid"}) + "\n")
        print(f"# {date.today()} {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}")
        print(f"{len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} M chars in one file\n")
        print("| workers | wall s | docs/s (wall) | CPU s (all processes) | docs per CPU-second | load average before |")
        print("|---:|---:|---:|---:|---:|---:|")
        for workers in (1, 2):
            load = os.getloadavg()[0]
            r = Recipe.model_validate(
                {
                    "name": "s",
                    "run_dir": str(tmp / f"w{workers}"),
                    "data": {"domains": {"en": {"train": [str(tmp / "train.jsonl")], "valid": [str(tmp / "valid.jsonl")]}}},
                    "curate": {"workers": workers, "plots": False, "docs_per_shard": 250},
                }
            )
            def cpu() -> float:  # this process + its finished children (the pool is joined at the end)
                a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

            t, c = time.perf_counter(), cpu()
            run_curate(r, r.root / "curate")
            dt, dc = time.perf_counter() - t, cpu() - c
            print(f"| {workers} | {dt:.1f} | {len(docs) / dt:,.0f} | {dc:.1f} | {len(docs) / dc:,.0f} | {load:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
