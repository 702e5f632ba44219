"""Muon for the transformer's hidden matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each 2-D weight's
momentum update by the nearest semi-orthogonal matrix (U V^T of its SVD), approximated by a few
Newton-Schulz iterations. Every direction of the update then moves by the same amount, which is
what makes small models learn faster per token than with AdamW. Embeddings, the output head and
norm gains are not "hidden" matrices and keep AdamW.

Step size: the orthogonalized update is scaled by 0.2 * sqrt(max(rows, cols)) so that its RMS
matches a typical AdamW update (Liu et al. 2025, "Muon is scalable for LLM training"). One learning
rate and one schedule then drive both kinds of parameters, and `pretrain.lr` keeps its meaning.

One optimizer object (param groups tagged "muon": True/False) so the engine's schedule, gradient
clipping and distributed checkpointing treat it like AdamW. Under FSDP a matrix is sharded across
processes and cannot be orthogonalized locally: the pretrain stage refuses muon with fsdp.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Coefficients of the quintic iteration (Jordan et al.): they push singular values towards ~1
# quickly from anywhere in (0, 1] rather than converging exactly, which the update does not need.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by Newton-Schulz iterations on the smaller Gram matrix."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + 1e-7)  # singular values into (0, 1], where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def hidden_matrices(model: nn.Module) -> set[nn.Parameter]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections)."""
    inside_block = re.compile(r"(^|\.)layers\.\d+\.")  # also under a DDP wrapper ("module.layers.0...")
    return {p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and inside_block.search(name)}


class Muon(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), momentum: float = 0.95,
                 eps: float = 1e-8, ns_steps: int = 5):  # fmt: skip
        hidden = hidden_matrices(model)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p in hidden], "muon": True, "weight_decay": weight_decay},
            {"params": [p for p in params if p not in hidden and p.dim() >= 2], "muon": False, "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "muon": False, "weight_decay": 0.0},
        ]
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, ns_steps=ns_steps)
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group["muon"]:
                    self._muon_update(p, group)
                else:
                    self._adam_update(p, group)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=group["momentum"])
        update = orthogonalize(nesterov, group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)

    def _adam_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
