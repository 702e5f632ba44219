"""HeuriMentor's cost per training step: the same training with its hooks on vs off.

The tiny recipe's model and batch (1.84M parameters, 16 x 256 tokens, EN/ZH/code), run through the
one training loop (Trainer.fit) twice per repeat, in alternating order (off/on, on/off, ...):

    off  the loop's default hooks: no monitor, no control file, no events (same data, same lr)
    on   HeuriMentor's hooks as `openmill pretrain` installs them: per-source loss capture, the
         spike test, the step-boundary checks (phase budget, control file, SIGTERM), and at log
         steps the monitor's read-out and the mixture/seen metrics

The time per step is measured between the first and the last log step of each run (so model
build, the step-0 evaluation and the final checkpoint are outside it); the table gives the median
over repeats. Also recorded: the monitor's own time per step (`TrainingMonitor.host_seconds`; on
a CPU the ops run synchronously, so this is the monitor's whole cost). Both arms in one process,
back to back:

    .venv/bin/python benchmarks/heurimentor_overhead.py --prepared runs/heurimentor_bench/prepared
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from openmill.config import load_recipe
from openmill.data.dmu import DataManagementUnit
from openmill.data.shards import TokenShards
from openmill.model import build_model
from openmill.stages import run_recipe
from openmill.tokenizer import Tokenizer
from openmill.train.engine import Trainer, TrainingHooks
from openmill.train.heurimentor import HeuriMentor
from openmill.train.metrics import MetricsLog
from openmill.train.monitor import TrainingMonitor
from openmill.train.parallel import init_world

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY = REPO / "recipes" / "tiny.yaml"


def timed_run(recipe, prepared: Path, heurimentor: bool, steps: int) -> tuple[float, float]:
    """Seconds per step between the first and last log step; the monitor's seconds per step."""
    cfg = recipe.pretrain
    world = init_world()
    torch.manual_seed(recipe.seed)
    weights = recipe.domain_weights(cfg.mixture)
    train = {d: TokenShards(prepared / "tokens" / d / "train") for d in weights}
    dmu = DataManagementUnit(cfg, weights, train, recipe.seed)
    vocab = Tokenizer.load(prepared / "tokenizer" / "tokenizer.json").vocab_size
    model = build_model(recipe.model.resolved(vocab_size=vocab), device=world.device)

    def batch_fn(step: int):
        x, y, tags = dmu.batch(step, world.rank, world.size)
        return [(x, y, tags)]

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pretrain"
        monitor = TrainingMonitor(cfg.monitor, dmu.sources, world.device)
        hooks = HeuriMentor(cfg, dmu, monitor, world, Path(tmp), log=lambda *a: None) if heurimentor else TrainingHooks()
        stateful = {"dmu": dmu, "monitor": monitor, "heurimentor": hooks} if heurimentor else {}
        trainer = Trainer(model, model, cfg, world, out, batch_fn, eval_fn=lambda m: {}, stateful=stateful, log=lambda *a: None, hooks=hooks)
        stamps = {}
        trainer.fit(MetricsLog(out, True, False, None), lambda step, loss, tps: stamps.setdefault(step, time.perf_counter()))
    first, last = min(stamps), max(stamps)
    return (stamps[last] - stamps[first]) / (last - first), monitor.host_seconds / steps if heurimentor else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", type=Path, default=REPO / "runs" / "heurimentor_bench" / "prepared")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    overrides = [
        "stages=[tokenizer,tokenize,pretrain]", f"pretrain.steps={args.steps}", "pretrain.phases=[]",
        "pretrain.eval_every=100000", "pretrain.checkpoint_every=100000", "pretrain.tensorboard=false",
        f"run_dir={args.prepared}",
    ]  # fmt: skip
    recipe = load_recipe(TINY, overrides)
    if not (args.prepared / "tokens").is_dir():
        run_recipe(recipe, ["tokenizer", "tokenize"])
    timings = {"off": [], "on": []}
    monitor = []
    timed_run(recipe, args.prepared, True, 12)  # warm-up: first-call allocations, page cache
    for i in range(args.repeats):
        for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
            per_step, monitor_per_step = timed_run(recipe, args.prepared, arm == "on", args.steps)
            timings[arm].append(per_step)
            if arm == "on":
                monitor.append(monitor_per_step)
    off, on = statistics.median(timings["off"]), statistics.median(timings["on"])
    result = {
        "command": f".venv/bin/python benchmarks/heurimentor_overhead.py --steps {args.steps} --repeats {args.repeats}",
        "machine": f"{platform.machine()}, 2-core CPU, 2 threads, idle machine, torch {torch.__version__}",
        "date": "2026-11-23",
        "seconds_per_step": timings,
        "median_off": off,
        "median_on": on,
        "overhead": on / off - 1,
        "monitor_seconds_per_step": statistics.median(monitor),
        "monitor_fraction": statistics.median(monitor) / on,
    }
    (HERE / "heurimentor_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
