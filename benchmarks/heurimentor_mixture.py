"""Static uniform mixture vs staged phases vs the `underlearned` policy, equal tokens, same model.

Aquila2's question at small scale on the embedded EN/ZH/code data (recipes/tiny.yaml's corpus and
tokenizer settings): three pretraining runs that differ only in how the mixture moves; the table
gives each source's final validation loss (nats/token) and bits per byte and their average, and
`mixture_<policy>.png` the weights over time (each run's pretrain/report.md has more).

    nice -n 10 .venv/bin/python benchmarks/heurimentor_mixture.py --steps 300 --out runs/heurimentor_bench

The tokenizer and token shards are built once and shared by the three runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from openmill.config import load_recipe
from openmill.stages import run_recipe
from openmill.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
SOURCES = ("en", "zh", "code")

POLICIES = {
    "static": ["pretrain.phases=[]", "pretrain.mixture={en: 1, zh: 1, code: 1}"],
    # Aquila2-style: broad language modelling first, then more of the harder sources.
    "staged": [
        "pretrain.mixture={en: 1, zh: 1, code: 1}",
        "pretrain.phases=[{name: language, steps: 2}, {name: focus, steps: 1, mixture: {en: 0.6, zh: 1.4, code: 1.0}}]",
    ],
    "underlearned": ["pretrain.phases=[]", "pretrain.mixture={en: 1, zh: 1, code: 1}", "pretrain.policy.kind=underlearned"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "heurimentor_bench")
    args = ap.parse_args()
    common = [
        "stages=[tokenizer,tokenize,pretrain]", f"pretrain.steps={args.steps}", "pretrain.eval_every=50",
        "pretrain.checkpoint_every=100000", "pretrain.tensorboard=false", "pretrain.warmup_steps=30",
    ]  # fmt: skip
    prepared = args.out / "prepared"
    if not (prepared / "tokens").is_dir():
        run_recipe(load_recipe(TINY, common + [f"run_dir={prepared}"]), ["tokenizer", "tokenize"])
    rows = {}
    for policy, extra in POLICIES.items():
        root = args.out / policy
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(prepared, root)
        recipe = load_recipe(TINY, common + extra + [f"run_dir={root}"])
        started = time.time()
        run_recipe(recipe, ["pretrain"])
        records = read_metrics(root / "pretrain" / "metrics.jsonl")
        last = [r for r in records if "val/en/loss" in r][-1]
        rows[policy] = {s: (last[f"val/{s}/loss"], last[f"val/{s}/bpb"]) for s in SOURCES}
        rows[policy]["seconds"] = time.time() - started
        shutil.copy(root / "pretrain" / "mixture.png", args.out / f"mixture_{policy}.png")
    lines = [
        f"command: nice -n 10 .venv/bin/python benchmarks/heurimentor_mixture.py --steps {args.steps}",
        f"machine: {platform.machine()} {platform.processor() or ''}, 2 CPU cores shared with other jobs; date 2026-11-23",
        "",
        "| policy | " + " | ".join(f"{s} loss / bpb" for s in SOURCES) + " | average loss | average bpb | seconds |",
        "|---|" + "---|" * (len(SOURCES) + 3),
    ]
    for policy, r in rows.items():
        avg_loss = sum(r[s][0] for s in SOURCES) / len(SOURCES)
        avg_bpb = sum(r[s][1] for s in SOURCES) / len(SOURCES)
        cells = " | ".join(f"{r[s][0]:.4f} / {r[s][1]:.4f}" for s in SOURCES)
        lines.append(f"| {policy} | {cells} | {avg_loss:.4f} | {avg_bpb:.4f} | {r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "result.md").write_text(text + "\n")
    (args.out / "result.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
