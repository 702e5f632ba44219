"""Inference: decode speed of openmill's engine vs `transformers` `generate`, and the perplexity
cost of weight-only int8/int4 quantization, on SmolLM2-135M-Instruct (fp32), in one run.

    python benchmarks/inference.py [--folder DIR] [--new-tokens 32] [--repeats 3] [--ppl-windows 16]
        [--parts speed,ppl] [--modes eager,compiled]

--folder: an openmill model folder of SmolLM2 (default: the test cache's import,
~/.cache/openmill-tests/smollm2-135m-instruct; create it with
`openmill import SmolLM2-135M-Instruct.Q4_1.gguf --out DIR`). Results: benchmarks/inference.md.

Speed: both sides greedy, the same prompts (8 of different lengths; batch 1 uses the first),
exactly --new-tokens new tokens each (no early stop), timed end to end (prefill + decode),
back to back in this one process, the two sides taking turns, median of --repeats after one
warm-up each. Each side twice: eager
(transformers `generate` with its default dynamic cache; openmill's engine on the model as `openmill
chat` and `openmill serve` load it: q/k/v and gate/up fused and every projection packed in oneDNN's
layout, see Transformer.pack_weights) and compiled
(transformers with its static cache + torch.compile of the decode forward, `CompileConfig(mode=
"default")` forced on CPU; openmill's `compile=True` on the same packed model); the warm-up call's extra time over the
median is reported as compile_s, never folded into tokens/s. Quality: WikiText-2
test perplexity over the first --ppl-windows non-overlapping windows of 512 tokens (the model's
BOS first), every variant on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from openmill.generate import SamplingParams, generate_batch
from openmill.generate.quantize import quantize_model
from openmill.textmodel import load_text_model

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"
PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):",
    "Once upon a time, in a small village by the sea, there lived",
    "中华人民共和国",
    "Photosynthesis is the process by which plants",
    "The three most important rules of writing clear code are",
    "Q: What is the capital of France?\nA:",
    "In 1969, astronauts",
]


def timed(fns: list, repeats: int) -> list[tuple[float, float]]:
    """For each fn: (median seconds of `repeats` calls, the warm-up call's extra seconds: compilation).
    The fns take turns call by call, so a slow spell of this shared VM hits both sides alike."""
    first, times = [], [[] for _ in fns]
    for fn in fns:  # warm-up
        t = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t)
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [(statistics.median(ts), max(0.0, f - statistics.median(ts))) for f, ts in zip(first, times, strict=True)]


def openmill_run(model, prompts: list[list[int]], n: int, compile: bool = False):
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return lambda: [r.tokens for r in generate_batch(model, prompts, params, compile=compile)]


def hf_run(hf, prompts: list[list[int]], n: int, pad_id: int, compile: bool = False):
    from transformers import CompileConfig

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding, as HF batches
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    extra = {}
    if compile:  # transformers compiles only on accelerators unless told otherwise
        config = CompileConfig(mode="default")
        config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": config}

    def run():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id, **extra
            )
        return out[:, width:].tolist()

    return run


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w[None, :-1])[0]
        nll += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path.home() / ".cache" / "openmill-tests" / "smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--wikitext", type=Path, default=WIKITEXT, help="WikiText-2 test.txt (../shared/data from the repo root)")
    ap.add_argument("--parts", default="speed,ppl", help="what to measure: speed, ppl or both")
    ap.add_argument("--modes", default="eager,compiled", help="speed: eager, compiled or both")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("inference.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import transformers
    from transformers import AutoModelForCausalLM

    from openmill.export import export_hf

    model, tok = load_text_model(args.folder)
    model.pack_weights()  # as `openmill chat` and `openmill serve` run it
    prompts = [tok.document_prefix() + tok.encode(p) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.folder, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    rows = []

    def record(**row):
        row.update(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)

    parts = set(args.parts.split(","))
    # Same greedy tokens first (batch 1): the comparison is only meaningful between equal outputs.
    # At batch 8 transformers' left padding may shift a near-tie (its padded rows see other positions'
    # numerics); the row count that agrees is recorded, not required.
    for batch in (1, 8) if "speed" in parts else ():
        ours = openmill_run(model, prompts[:batch], args.new_tokens)()
        theirs = hf_run(hf, prompts[:batch], args.new_tokens, tok.pad_id)()
        record(check=f"greedy tokens equal (batch {batch})", rows_equal=sum(a == b for a, b in zip(ours, theirs, strict=True)), rows=batch)

    modes = [m == "compiled" for m in args.modes.split(",")]
    for batch in (1, 8) if "speed" in parts else ():
        ps = prompts[:batch]
        tokens = batch * args.new_tokens
        for compile in modes:
            hf_fn, om_fn = hf_run(hf, ps, args.new_tokens, tok.pad_id, compile), openmill_run(model, ps, args.new_tokens, compile)
            (t_hf, c_hf), (t_om, c_om) = timed([hf_fn, om_fn], args.repeats)
            eager_om = openmill_run(model, ps, args.new_tokens)() if compile else None
            record(bench="decode", batch=batch, new_tokens=args.new_tokens, compiled=compile, openmill_tok_s=tokens / t_om,
                   transformers_tok_s=tokens / t_hf, speedup=t_hf / t_om, openmill_compile_s=c_om, transformers_compile_s=c_hf,
                   **({"compiled_tokens_equal_eager": om_fn() == eager_om, "transformers_compiled_tokens_equal_eager": hf_fn() == hf_run(hf, ps, args.new_tokens, tok.pad_id)()} if compile else {}))

    if "ppl" not in parts:
        return save(rows, args.out)
    if not args.wikitext.is_file():
        raise SystemExit(f"--wikitext: {args.wikitext} not found")
    ids = tok.encode(args.wikitext.read_text(encoding="utf-8"))
    n = args.ppl_windows
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    windows = torch.tensor([[bos] + ids[i * 511 : (i + 1) * 511] for i in range(n)])
    base = perplexity(model, windows)
    record(bench="wikitext2-ppl", variant="fp32", tokens=n * 511, ppl=base, delta_pct=0.0)
    for variant, mode, group in (("int8", "int8", 0), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64)):
        q, _ = load_text_model(args.folder)
        quantize_model(q, mode, group_size=group or 64)
        ppl = perplexity(q, windows)
        record(bench="wikitext2-ppl", variant=variant, tokens=n * 511, ppl=ppl, delta_pct=100 * (ppl / base - 1))
    save(rows, args.out)


def save(rows: list[dict], out: Path) -> None:
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
