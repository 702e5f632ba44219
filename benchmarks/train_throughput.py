"""Training tokens/s: openmill's Transformer vs transformers' LlamaForCausalLM, same shape/batch/dtype.

One full optimizer step per iteration (forward, loss, backward, clip, AdamW), fused AdamW for both,
weights copied so both train the same numbers. Reports tokens/s, the ratio, and a "MFU" against
the measured fp32 matmul peak on CPU (or the bf16 datasheet peak on GPU).

    .venv/bin/python benchmarks/train_throughput.py [--shape tiny|small|125m] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F

from openmill.config import ModelConfig
from openmill.model import build_model
from openmill.train.engine import flops_per_token, peak_flops

SHAPES = {
    # name: (ModelConfig fields, batch, seq_len)
    "demo": (dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, tie_embeddings=True), 16, 256),
    "tiny": (dict(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, tie_embeddings=True), 16, 256),
    "small": (dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, tie_embeddings=True), 8, 512),
    "125m": (dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, tie_embeddings=True), 16, 1024),
}


def hf_twin(model):
    """A LlamaForCausalLM with the same shape and weights as an openmill Transformer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).to(model.embed_tokens.weight.device)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    return hf


def time_steps(step_fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def make_step(model, forward_loss, batch, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = forward_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_loss(model, batch):
    x, y = batch
    return model(x, targets=y)  # as the engine calls it: loss fused with the output projection


def hf_loss(model, batch):
    x, y = batch
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="demo")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bf16" if device.type == "cuda" else "fp32"
    fields, batch_size, seq_len = SHAPES[args.shape]
    cfg = ModelConfig(max_seq_len=seq_len, **fields).resolved()
    torch.manual_seed(0)
    ours = build_model(cfg, device=device)
    hf = hf_twin(ours)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])
    with torch.no_grad():
        diff = (ours(batch[0]) - hf(input_ids=batch[0]).logits).abs().max().item()
    tokens = batch_size * seq_len
    peak = peak_flops(device)
    fpt = flops_per_token(ours, seq_len)

    rows = []
    variants = [("openmill", ours, ours_loss, False), ("transformers", hf, hf_loss, False)]
    if args.compile:
        variants += [("openmill+compile", ours, ours_loss, True), ("transformers+compile", hf, hf_loss, True)]
    for name, model, fl, comp in variants:
        m = model
        if comp and name.startswith("openmill"):
            m = build_model(cfg, device=device)
            m.load_state_dict(ours.state_dict())
            for block in m.layers:  # as train/parallel.py compiles: block by block
                block.compile()
        elif comp:
            m = torch.compile(model)
        sec = time_steps(make_step(m, fl, batch, device, dtype), args.steps, args.warmup, device)
        rows.append({"model": name, "s_per_step": sec, "tokens_per_s": tokens / sec, "mfu": tokens / sec * fpt / peak})

    base = {r["model"]: r["tokens_per_s"] for r in rows}
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"shape={args.shape} params={n_params / 1e6:.1f}M batch={batch_size} seq={seq_len} dtype={dtype} "
          f"device={torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'} "
          f"threads={torch.get_num_threads()} peak={peak / 1e9:.0f} GFLOP/s logits max|diff|={diff:.2e}")  # fmt: skip
    print(f"| model | tokens/s | vs transformers (eager) | MFU |\n|---|---:|---:|---:|")
    for r in rows:
        ratio = r["tokens_per_s"] / base["transformers"]
        print(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['mfu']:.1%} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"date": str(date.today()), "shape": args.shape, "device": str(device), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
