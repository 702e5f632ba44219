"""LoRA: a trainable low-rank update beside frozen projections, merged back for export.

y = W x + (alpha / r) * B (A x), with A (r, in) random and B (out, r) zero, so training starts
from exactly the base model. Only A and B get gradients and optimizer state (2 r (in + out) per
projection instead of in * out). `merge_lora` folds B A into W and puts the plain nn.Linear back,
so the saved folder has the ordinary parameter names and exports like any other model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openmill.align.config import LoraConfig


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale
        return self.base


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Freeze every weight and wrap the target projections of each block; returns trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in cfg.targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoraLinear(child, cfg.rank, cfg.alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place; the model is plain again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
