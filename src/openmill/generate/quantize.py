"""Weight-only quantization for openmill's own inference: every nn.Linear swapped in place.

- int8: per output channel, symmetric: w ≈ q * scale, q in [-127, 127].
- int4: per group of `group_size` input columns, asymmetric: w ≈ (q - 8) * scale + zero, q in
  [0, 15], the layout of PyTorch's CPU int4 kernel (tinygemm on CUDA uses the same formula).

Activations stay in the model's dtype; the matmuls run in PyTorch's packed-weight kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) for a few rows (decoding); longer inputs multiply by the
dequantized matrix (see PACKED_KERNEL_MAX_ROWS). The measured quality cost is in
benchmarks/inference.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
# PyTorch's packed CPU kernels are fast for a few rows (decoding: memory-bound, where int8/int4 pay
# off) but ~20x slower than an fp32 GEMM for hundreds (prefill, perplexity; measured on this CPU
# with 511 x 576 @ 576 x 1536). Above this many rows the layer multiplies by its dequantized weight
# instead: the same numbers (tested to 1e-4), a transient fp32 copy of one matrix.
PACKED_KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) > PACKED_KERNEL_MAX_ROWS:
            return F.linear(x, self.dequantized().to(x.dtype))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        n, k = linear.weight.shape
        if k % group_size:
            raise ValueError(f"int4: {k} input features are not a multiple of group_size {group_size}")
        w = linear.weight.detach().float().view(n, k // group_size, group_size)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-12) / 15
        q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (k / group, n, 2): scale and zero per group, the kernel's layout.
        self.register_buffer("scales_zeros", torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous())
        # Unpacked codes for dequantized() (long inputs, tests): one byte per weight on top of the
        # packed half byte, so int4 here saves less memory than the format could.
        self.register_buffer("q", q.to(torch.uint8), persistent=False)
        self.group_size, self.in_features, self.out_features = group_size, k, n

    def dequantized(self) -> torch.Tensor:
        sz = self.scales_zeros.transpose(0, 1)  # (n, groups, 2)
        q = self.q.float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) > PACKED_KERNEL_MAX_ROWS:
            return F.linear(x, self.dequantized().to(x.dtype))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """Swap every nn.Linear of `model` (blocks and output head) for its quantized form, in place.
    The embedding stays in full precision (a lookup, not a matmul), tied or not. CPU only: the
    packed kernels used here are PyTorch's CPU ones."""
    if mode not in MODES:
        raise ValueError(f"quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    # Packed weights are plain attributes, not buffers, so the fused check below cannot see them.
    if getattr(model, "is_packed", False):
        raise ValueError("quantize: the model's weights are packed (pack_weights); quantize before packing")
    if any(name.endswith(("qkv_weight", "gate_up_weight")) for name, _ in model.named_buffers()):
        raise ValueError("quantize: the model's projections are fused (fuse_projections); quantize before fusing")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size))
    return model


def _dequantized_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The naive path: a full matmul with the dequantized weight (tests compare the kernels to it)."""
    return F.linear(x, module.dequantized().to(x.dtype))
