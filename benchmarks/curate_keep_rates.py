"""How much real text the default rules keep, per source and per filter (the demo corpus included).

    .venv/bin/python benchmarks/curate_keep_rates.py

Chinese: all 1,564 PRC laws (whole documents), all CMRC 2018 contexts, all C3 passages (C3 is
non-commercial: read here only). English: 4 KB chunks of all Gutenberg books. Code: every
TheAlgorithms file with content. Demo: data/default, with the domain rules of the default config.
"Quality+repetition keep" is over the documents that reach those filters (after length and
language), the number the issue's Chinese criterion asks for.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from datetime import date
from pathlib import Path

import curate_data as data

from openmill.data.curate.config import CurateConfig
from openmill.data.curate.pipeline import DomainPipeline

DEMO = Path(__file__).resolve().parents[1] / "data" / "default"


def run(domain: str, docs: list[str]) -> tuple[Counter, dict, float]:
    pipe = DomainPipeline(CurateConfig().rules_for(domain))
    drops: Counter = Counter()
    t = time.process_time()
    for d in docs:
        out = pipe.process(d)
        if out.filter:
            drops[(out.filter, out.reason)] += 1
    return drops, pipe.stats, len(docs) / (time.process_time() - t)


def main() -> None:
    sources = {
        ("zh", "PRC laws (whole)"): data.chinese_laws_whole(),
        ("zh", "CMRC 2018 contexts"): data.cmrc_contexts(),
        ("zh", "C3 passages"): data.c3_passages(),
        ("en", "Gutenberg books, 4 KB chunks"): data.english_books(4000),
        ("code", "TheAlgorithms/Python files"): data.python_files(),
    }
    for domain in ("en", "zh", "code"):
        sources[(domain, f"demo data/default/{domain}")] = [
            json.loads(line)["text"]
            for split in ("train", "valid")
            for line in open(DEMO / domain / f"{split}.jsonl", encoding="utf-8")
        ]
    print(f"# {date.today()} {platform.machine()} python {platform.python_version()}\n")
    print(
        "| domain rules | source | docs | kept by the chain | quality+repetition keep | docs/s/core | drops (filter/reason: n) |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for (domain, name), docs in sources.items():
        drops, stats, rate = run(domain, docs)
        kept = len(docs) - sum(drops.values())
        reach = [stats[s] for s in ("quality", "repetition") if s in stats]
        qr = f"{reach[-1].docs_out / reach[0].docs_in:.3f}" if reach and reach[0].docs_in else "-"
        why = ", ".join(f"{f}/{r}: {n}" for (f, r), n in drops.most_common())
        print(f"| {domain} | {name} | {len(docs):,} | {kept / len(docs):.3f} | {qr} | {rate:,.0f} | {why} |")


if __name__ == "__main__":
    main()
