"""What openmill's precomputed reference log-probs save in a DPO training step, on SmolLM2-135M.

    .venv/bin/python benchmarks/align_memory.py \\
        --json benchmarks/align_memory.json

Two ways to train the same DPO steps (sigmoid loss, AdamW, the same pairs), each in a fresh
subprocess so that its peak resident memory (getrusage ru_maxrss) is its own:
- precomputed (openmill): the reference log-probs of the pairs are computed once with the
  starting model (dpo.reference_logps) before training; the step runs the policy only.
- reference_model (TRL's default, precompute_ref_log_probs=False): a frozen copy of the starting
  model stays in memory and runs on each batch (no grad) before the policy's step.
- full_logits: as precomputed, but the sequence log-probs come from full-vocabulary (B, T, V)
  logits and a log-softmax (openmill's path before the chunked, answer-only output head,
  model.forward's target_logps), to measure what that head saves.
The pairs are fixed random tokens (PAIRS pairs, prompt PROMPT + answer ANSWER tokens per side), so
the measure does not depend on a data set. Seconds per step: median after the first step.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("precomputed", "reference_model", "full_logits")


def full_logits_sequence_logps(model, inputs, targets):
    """The sequence log-probs through (B, T, V) logits and log_softmax (the path before target_logps)."""
    logits = model(inputs).float()
    keep = targets != -100
    picked = torch.gather(torch.log_softmax(logits, dim=-1), 2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


def pairs(n: int, prompt: int, answer: int, vocab: int):
    from openmill.align.sft import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        sides = []
        for _ in range(2):
            ids = p + torch.randint(0, vocab, (answer + 1,), generator=g).tolist()
            sides.append(Example(ids[:-1], [-100] * (prompt - 1) + ids[prompt:]))
        out.append(tuple(sides))
    return out


def child(mode: str, model_dir: Path, n_pairs: int, prompt: int, answer: int, steps: int) -> dict:
    from openmill.align import dpo
    from openmill.align.config import DpoConfig
    from openmill.align.dpo import make_loss, pair_batch, reference_logps
    from openmill.textmodel import load_text_model

    if mode == "full_logits":
        dpo.sequence_logps = full_logits_sequence_logps  # the loss and the reference pass both use it

    torch.manual_seed(0)
    model, tok = load_text_model(model_dir)
    model.train()
    batch = pairs(n_pairs, prompt, answer, model.cfg.vocab_size)
    x, y = pair_batch(batch, tok.pad_id)
    loss_fn = make_loss(DpoConfig(beta=0.1))
    if mode != "reference_model":
        ref = reference_logps(model, batch, tok.pad_id, batch_pairs=n_pairs)
        reference = None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
    rss_before_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if reference is not None:  # what TRL does each step without precompute_ref_log_probs
            ref = reference_logps(reference, batch, tok.pad_id, batch_pairs=n_pairs)
        loss = loss_fn(model, x, y, ref)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {
        "mode": mode,
        "parameters_mib": sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mib_before_steps": rss_before_steps / 1024,
        "seconds_per_step": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "losses": losses,
        "tokens_per_step": int(x.numel()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path.home() / ".cache" / "openmill-tests" / "smollm2-135m-instruct")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--answer", type=int, default=384)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.pairs, args.prompt, args.answer, args.steps)))
        return
    if not (args.model / "model.json").is_file():
        sys.exit(f"error: {args.model}: not a model folder; build it with `openmill import SmolLM2-135M-Instruct.Q4_1.gguf --out {args.model}`")
    runs = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", str(args.model), "--pairs", str(args.pairs),
               "--prompt", str(args.prompt), "--answer", str(args.answer), "--steps", str(args.steps)]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    pre, ref, full = runs["precomputed"], runs["reference_model"], runs["full_logits"]
    result = {
        "command": " ".join(["benchmarks/align_memory.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": {"pairs": args.pairs, "tokens_per_side": args.prompt + args.answer, "answer_tokens": args.answer},
        "runs": runs,
        "saved_mib": ref["peak_rss_mib"] - pre["peak_rss_mib"],
        "saved_fraction": 1 - pre["peak_rss_mib"] / ref["peak_rss_mib"],
        "same_losses": max(abs(a - b) for a, b in zip(pre["losses"], ref["losses"])),
        "target_logps_saved_mib": full["peak_rss_mib"] - pre["peak_rss_mib"],
        "target_logps_step_speedup": full["seconds_per_step"] / pre["seconds_per_step"],
        "full_logits_loss_difference": max(abs(a - b) for a, b in zip(pre["losses"], full["losses"])),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
