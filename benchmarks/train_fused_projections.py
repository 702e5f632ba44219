"""Would fusing q/k/v and gate/up into one matmul each speed up CPU training? (Measured: no.)

An experiment behind benchmarks/README.md's "Training throughput": openmill's Attention and
FeedForward forwards are swapped for variants that concatenate the projection weights and run one
`F.linear` each (gradients flow back through the concatenation), and full training steps
(forward, fused loss, backward, clip, AdamW) are timed against the unmodified model, alternating,
median of 3, with and without per-block `torch.compile`.

    .venv/bin/python benchmarks/train_fused_projections.py demo small [--eager-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import SHAPES, make_step, ours_loss, time_steps  # noqa: E402

from openmill import model as M  # noqa: E402
from openmill.config import ModelConfig  # noqa: E402

PLAIN = M.Attention.forward, M.FeedForward.forward


def fused_attention(self, x, cos, sin, pos, cache, mask):
    """Training path of Attention.forward with one q/k/v matmul (no cache)."""
    cfg = self.cfg
    B, T, _ = x.shape
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    q, k = M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def fused_feed_forward(self, x):
    gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
    return self.down_proj(F.silu(gate) * up)


def tokens_per_s(shape: str, fused: bool, compiled: bool) -> float:
    M.Attention.forward, M.FeedForward.forward = (fused_attention, fused_feed_forward) if fused else PLAIN
    fields, batch_size, seq_len = SHAPES[shape]
    cfg = ModelConfig(max_seq_len=seq_len, **fields).resolved()
    torch.manual_seed(0)
    model = M.build_model(cfg)
    if compiled:
        for block in model.layers:
            block.compile()
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    cpu = torch.device("cpu")
    sec = time_steps(make_step(model, ours_loss, (x[:, :-1], x[:, 1:]), cpu, "fp32"), 8, 3, cpu)
    return batch_size * seq_len / sec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="+", choices=SHAPES)
    ap.add_argument("--eager-only", action="store_true")
    args = ap.parse_args()
    for shape in args.shapes:
        for compiled in (False,) if args.eager_only else (False, True):
            runs = {False: [], True: []}
            for _ in range(3):
                for fused in (False, True):
                    runs[fused].append(tokens_per_s(shape, fused, compiled))
            plain, fused = (sorted(runs[k])[1] for k in (False, True))
            mode = "compile" if compiled else "eager"
            print(f"{shape} {mode}: plain {plain:,.0f} tok/s, fused {fused:,.0f} tok/s, ratio {fused / plain:.3f}", flush=True)


if __name__ == "__main__":
    main()
