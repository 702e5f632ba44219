"""SOLAR's Depth Up-Scaling claim at small scale, on the embedded EN/ZH/code data.

Pretrain an 8-layer model; make 12-layer models three ways and continue each for the same tokens,
next to continuing the 8-layer model itself:

    dus      layers 0-5 + 2-7 (SOLAR's recipe, n=8, m=2)
    repeat   layers 0-5 + 0-5 (naive repetition)
    random   a 12-layer model from random initialisation
    8-layer  the pretrained model, continued as is

Every continuation is the continue_pretrain stage's own code (ContinuePretrainConfig ->
run_pretrain with init_from): same data order, batch, steps, warm-up and schedule. Recorded:
validation loss right after scaling (the step-0 evaluation), the loss curves (dus_loss.png) and the
final validation loss and bits per byte, in dus_results.json and the table printed at the end.

    PYTHONPATH=src .venv/bin/python benchmarks/dus.py [--pretrain-steps 150] [--continue-steps 60] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from openmill.config import load_recipe
from openmill.stages import run_recipe
from openmill.surgery.config import ContinuePretrainConfig
from openmill.surgery.upscale import upscale
from openmill.train.metrics import read_metrics
from openmill.train.pretrain import run_pretrain

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAPS = {"dus": [*range(0, 6), *range(2, 8)], "repeat": [*range(0, 6), *range(0, 6)]}


def mean_val(record: dict, key: str) -> float:
    values = [v for k, v in record.items() if k.startswith("val/") and k.endswith(f"/{key}")]
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--continue-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--continue-lr", type=float, default=1e-3)
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench-dus")
    args = ap.parse_args()

    common = [f"run_dir={args.run_dir}", f"pretrain.batch_size={args.batch_size}", f"pretrain.seq_len={args.seq_len}",
              "pretrain.eval_every=20", "pretrain.eval_tokens=2048", "pretrain.log_every=5",
              "pretrain.checkpoint_every=1000", "pretrain.tensorboard=false"]
    base = load_recipe(REPO / "recipes" / "tiny.yaml", [
        *common, "stages=[curate,tokenizer,tokenize,pretrain]", "model.n_layers=8", f"model.dim={args.dim}", f"pretrain.steps={args.pretrain_steps}",
    ])
    started = time.time()
    run_recipe(base)
    root = base.root
    trained = root / "pretrain" / "final"
    cont = ContinuePretrainConfig(steps=args.continue_steps, warmup_steps=5, lr=args.continue_lr, eval_every=10, checkpoint_every=1000)

    variants: dict[str, Path | None] = {"8-layer": trained}
    for name, layer_map in MAPS.items():
        upscale(trained, root / "bench" / name / "model", layer_map, {"method": name})
        variants[name] = root / "bench" / name / "model"
    variants["random"] = None  # init_from None: run_pretrain builds model.n_layers=12 from scratch

    results = {}
    for name, init in variants.items():
        out = root / "bench" / name / "continued"
        recipe = base.model_copy(update={"model": base.model.model_copy(update={"n_layers": 12})})
        cfg = cont.pretrain_config(base.pretrain, init).model_copy(update={"tensorboard": False})
        if init is None:
            cfg = cfg.model_copy(update={"init_from": None})
        t = time.time()
        _, summary = run_pretrain(recipe.model_copy(update={"pretrain": cfg}), out, root / "tokenizer" / "tokenizer.json",
                                  root / "tokens", log=lambda *a: None)
        records = read_metrics(out / "metrics.jsonl")
        evals = [r for r in records if any(k.startswith("val/") for k in r)]
        results[name] = {
            "layers": 8 if name == "8-layer" else 12,
            "parameters": summary["parameters"],
            "val_loss_after_scaling": mean_val(evals[0], "loss"),
            "val_loss_final": mean_val(evals[-1], "loss"),
            "val_bpb_final": {d: v["final"] for d, v in summary["val_bpb"].items()},
            "tokens": summary["tokens"],
            "seconds": round(time.time() - t, 1),
            "curve": {"train": [(r["tokens"], r["loss"]) for r in records if "loss" in r],
                      "val": [(r["step"], mean_val(r, "loss")) for r in evals]},
        }
        print(f"{name}: after scaling {results[name]['val_loss_after_scaling']:.3f}, "
              f"final {results[name]['val_loss_final']:.3f} ({results[name]['seconds']} s)", flush=True)

    pre_evals = [r for r in read_metrics(root / "pretrain" / "metrics.jsonl") if any(k.startswith("val/") for k in r)]
    record = {
        "command": f"PYTHONPATH=src .venv/bin/python benchmarks/dus.py --pretrain-steps {args.pretrain_steps} "
                   f"--continue-steps {args.continue_steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --dim {args.dim} --continue-lr {args.continue_lr}",
        "date": str(date.today()), "machine": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}",
        "pretrained_8_layer_val_loss": mean_val(pre_evals[-1], "loss"),
        "continue": cont.model_dump(mode="json"), "seconds": round(time.time() - started),
        "variants": results,
    }
    (HERE / "dus_results.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(results, args.pretrain_steps, args.continue_steps, HERE / "dus_loss.png")
    print(f"\n8-layer model after pretraining: val loss {record['pretrained_8_layer_val_loss']:.3f}")
    print("| model | layers | val loss right after scaling | final val loss | final bpb en / zh / code |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        bpb = " / ".join(f"{v:.3f}" for v in r["val_bpb_final"].values())
        print(f"| {name} | {r['layers']} | {r['val_loss_after_scaling']:.3f} | {r['val_loss_final']:.3f} | {bpb} |")


def plot(results: dict, pretrain_steps: int, continue_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        tokens, loss = zip(*r["curve"]["train"])
        left.plot(tokens, loss, label=name)
        steps, val = zip(*r["curve"]["val"])
        right.plot(steps, val, marker="o", label=name)
    left.set(xlabel="tokens of continued pretraining", ylabel="train loss (nats)", title="training loss")
    right.set(xlabel="step of continued pretraining", ylabel="validation loss (nats, mean of en/zh/code)",
              title="validation loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DUS at small scale: 8-layer model pretrained {pretrain_steps} steps, each variant continued {continue_steps}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
