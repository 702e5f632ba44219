"""Static uniform mixture vs staged phases vs the `underlearned` policy, equal tokens, same model.

Aquila2's question at small scale on the embedded EN/ZH/code data (recipes/tiny.yaml's corpus,
tokenizer and model): three pretraining runs that differ only in how the mixture moves. Same seed,
same initial weights, same steps x batch x window (so the same number of training tokens), same
learning-rate schedule; each source is validated on the first `--eval-tokens` tokens of its
held-out `valid` split (never trained on; the same windows for every arm) every `--eval-every` steps.

    static        en/zh/code 1/3 each for the whole run
    staged        the same for the first 2/3 of the steps, then a fixed second phase
                  {en: 0.6, zh: 1.4, code: 1.0} (more of the source that is hardest for this model)
    underlearned  starts at 1/3 each; after every validation the policy moves weight toward the
                  sources that improved least (docs/heurimentor.md, eta 4, weights in [0.5, 2] x base)

Written next to this script: heurimentor_mixture.json (per-source final validation loss / bpb,
their average, tokens drawn per source, the validation curves) and heurimentor_mixture.png (the
mixture over time per arm and the average validation loss). Each run's own pretrain/report.md
stays under --out.

    .venv/bin/python benchmarks/heurimentor_mixture.py --steps 300

The tokenizer and token shards are built once and shared by the three runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from openmill.config import load_recipe
from openmill.stages import run_recipe
from openmill.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY = REPO / "recipes" / "tiny.yaml"
SOURCES = ("en", "zh", "code")

POLICIES = {
    "static": ["pretrain.phases=[]"],
    "staged": [
        "pretrain.phases=[{name: language, steps: 2}, {name: focus, steps: 1, mixture: {en: 0.6, zh: 1.4, code: 1.0}}]",
    ],
    "underlearned": ["pretrain.phases=[]", "pretrain.policy.kind=underlearned"],
}


def series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 3.4))
    for ax, (policy, r) in zip(axes, results.items()):
        for s in SOURCES:
            steps = sorted(int(k) for k in r["mixture"][s])
            ax.plot(steps, [r["mixture"][s][k] for k in steps], label=s)
        ax.set(title=f"{policy}: mixture", xlabel="step", ylim=(0, 0.7))
        ax.legend(fontsize=7)
    ax = axes[-1]
    for policy, r in results.items():
        steps = sorted(int(k) for k in r["val_average"])
        ax.plot(steps[1:], [r["val_average"][k] for k in steps[1:]], "o-", markersize=3, label=policy)
    ax.set(title="average validation loss", xlabel="step", ylabel="nats/token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "heurimentor_bench")
    args = ap.parse_args()
    common = [
        "stages=[tokenizer,tokenize,pretrain]", f"pretrain.steps={args.steps}", f"pretrain.eval_every={args.eval_every}",
        f"pretrain.eval_tokens={args.eval_tokens}", "pretrain.checkpoint_every=100000", "pretrain.tensorboard=false",
        "pretrain.warmup_steps=30", "pretrain.mixture={en: 1, zh: 1, code: 1}", "pretrain.optimizer=adamw",
    ]  # fmt: skip
    prepared = args.out / "prepared"
    if not (prepared / "tokens").is_dir():
        run_recipe(load_recipe(TINY, common + [f"run_dir={prepared}"]), ["tokenizer", "tokenize"])
    results = {}
    for policy, extra in POLICIES.items():
        root = args.out / policy
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(prepared, root)
        recipe = load_recipe(TINY, common + extra + [f"run_dir={root}"])
        started = time.time()
        run_recipe(recipe, ["pretrain"])
        records = read_metrics(root / "pretrain" / "metrics.jsonl")
        vals = {s: series(records, f"val/{s}/loss") for s in SOURCES}
        last = max(vals["en"])
        train_log = [r for r in records if "seen/en" in r][-1]
        results[policy] = {
            "final": {s: {"loss": vals[s][last], "bpb": series(records, f"val/{s}/bpb")[last]} for s in SOURCES},
            "average_loss": sum(vals[s][last] for s in SOURCES) / len(SOURCES),
            "average_bpb": sum(series(records, f"val/{s}/bpb")[last] for s in SOURCES) / len(SOURCES),
            "train_tokens": train_log["tokens"],
            "tokens_per_source": {s: train_log[f"seen/{s}"] for s in SOURCES},
            "val_average": {k: sum(vals[s][k] for s in SOURCES) / len(SOURCES) for k in sorted(vals["en"])},
            "val_loss": {s: vals[s] for s in SOURCES},
            "mixture": {s: series(records, f"mix/{s}") for s in SOURCES},
            "events": [r for r in records if r.get("event") in ("phase", "reweight")],
            "seconds": time.time() - started,
        }
    meta = {
        "command": f".venv/bin/python benchmarks/heurimentor_mixture.py --steps {args.steps} --eval-every {args.eval_every} --eval-tokens {args.eval_tokens}",
        "machine": f"{platform.machine()}, 2-core CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "date": "2026-11-23",
    }
    (HERE / "heurimentor_mixture.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    plot(results, HERE / "heurimentor_mixture.png")
    lines = [
        "| policy | " + " | ".join(f"{s} loss / bpb" for s in SOURCES) + " | average loss | average bpb | tokens en/zh/code |",
        "|---|" + "---|" * (len(SOURCES) + 3),
    ]
    for policy, r in results.items():
        cells = " | ".join(f"{r['final'][s]['loss']:.4f} / {r['final'][s]['bpb']:.4f}" for s in SOURCES)
        drawn = "/".join(f"{r['tokens_per_source'][s] / r['train_tokens']:.2f}" for s in SOURCES)
        lines.append(f"| {policy} | {cells} | {r['average_loss']:.4f} | {r['average_bpb']:.4f} | {drawn} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
