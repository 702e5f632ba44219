"""Next-token loss fused with the output projection, computed chunk by chunk.

Plain `cross_entropy(hidden @ W.T, targets)` materialises (N, V) logits, then its backward fills
another (N, V) zero tensor for the one-hot and runs a separate log-softmax backward: on a CPU
with an 8k vocabulary that is ~20% of a training step (measured, benchmarks/README.md). Here each
chunk of tokens gets its logits, log-sum-exp, loss and logit gradient (softmax - onehot) in
place, and the gradients of the hidden states and of W are accumulated during the forward; the
backward only scales them. Peak extra memory is one (chunk, V) block instead of two (N, V).
Numerically this is the same math as the plain path (tests/test_fused_loss.py compares them).
`linear_target_logps` gives the per-token log-probs of the targets the same chunked way (DPO's
sequence log-probs), on the kept positions only.
"""

from __future__ import annotations

import contextlib

import torch

IGNORE_INDEX = -100  # a target that takes no loss (prompt tokens, padding), as in torch's cross_entropy

# Observers of per-token losses (the training monitor's per-source loss, train/monitor.py): while a
# list is registered, each forward appends its detached (N,) token losses to it. Empty: no cost.
_TOKEN_LOSS_SINKS: list[list] = []


@contextlib.contextmanager
def record_token_losses(sink: list):
    _TOKEN_LOSS_SINKS.append(sink)
    try:
        yield sink
    finally:
        _TOKEN_LOSS_SINKS.remove(sink)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        ignore_index: int,
        grad_enabled: bool,
    ):
        """hidden (N, C), weight (V, C), targets (N,) -> mean loss over targets != ignore_index.

        `grad_enabled` is the caller's grad mode: `needs_input_grad` stays True under `no_grad`
        (validation), where building the gradients would double the cost for nothing.
        """
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]  # False for a frozen head (LoRA)
        need_grad = need_h or need_w
        w = weight.to(hidden.dtype)
        keep = targets != ignore_index
        n_keep = keep.sum().clamp(min=1)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 math for bf16/fp16 inputs
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        token_losses = [] if _TOKEN_LOSS_SINKS else None
        for s in range(0, hidden.shape[0], chunk):
            h, t, k = hidden[s : s + chunk], targets[s : s + chunk], keep[s : s + chunk]
            logits = (h @ w.t()).to(acc)  # (n, V)
            safe_t = torch.where(k, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            # One in-place pass for exp(x - max) serves both the log-sum-exp and the softmax.
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            lse = (peak + norm.log()).squeeze(1)
            per_token = (lse - picked) * k
            total += per_token.sum()
            if token_losses is not None:
                token_losses.append(per_token.detach())
            if need_grad:
                # d loss / d logits = (softmax - onehot) / n_keep on kept rows.
                scale = k.to(acc) / n_keep
                grad = probs.mul_(scale[:, None] / norm)
                grad[torch.arange(len(t), device=t.device), safe_t] -= scale
                g = grad.to(hidden.dtype)
                if need_h:
                    grad_h[s : s + chunk] = g @ w
                if need_w and h.dtype == acc:
                    grad_w.addmm_(g.t(), h)  # accumulate without a (V, C) temporary
                elif need_w:
                    grad_w += (g.t() @ h).to(acc)
        if token_losses is not None:
            for sink in _TOKEN_LOSS_SINKS:
                sink.append(torch.cat(token_losses))
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total / n_keep

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_h, grad_w)]
        return *scaled, None, None, None, None


def default_chunk(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: a (chunk, V) fp32 block of ~16 MB on CPU (cache-friendly, measured fastest
    at V=8k), ~256 MB on GPU (large matmuls keep the tensor cores busy)."""
    budget = (1 << 26) if device.type == "cuda" else (1 << 22)
    return max(64, budget // vocab_size)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token loss of hidden (..., C) against targets (...) through the projection weight (V, C)."""
    chunk = chunk or default_chunk(weight.shape[0], hidden.device)
    flat_h = hidden.flatten(0, -2)
    return LinearCrossEntropy.apply(flat_h, weight, targets.flatten(), chunk, ignore_index, torch.is_grad_enabled())


class LinearTargetLogProbs(torch.autograd.Function):
    """Per-token log-probabilities of the targets through the output projection, chunk by chunk.

    Unlike the mean loss above, each token's output gets its own upstream gradient (DPO weighs a
    sequence's tokens by that sequence's pair), so the weight gradient cannot be accumulated during
    the forward: the backward recomputes each chunk's logits from the saved hidden states and
    log-sum-exps instead of keeping (N, V) probabilities."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        """hidden (N, C), weight (V, C), targets (N,) valid ids -> (N,) log p(target)."""
        w = weight.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        out = torch.empty_like(lse)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ w.t()).to(acc)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        acc = lse.dtype
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t, g = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk], grad_out[s : s + ctx.chunk].to(acc)
            # d log p(t) / d logits = onehot(t) - softmax, times this token's upstream gradient.
            grad = (h @ w.t()).to(acc).sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad[torch.arange(len(t), device=t.device), t] += g
            grad = grad.to(hidden.dtype)
            grad_h[s : s + ctx.chunk] = grad @ w
            if h.dtype == acc:
                grad_w.addmm_(grad.t(), h)
            else:
                grad_w += (grad.t() @ h).to(acc)
        return grad_h, grad_w.to(weight.dtype), None, None


def linear_target_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """log p(target) of hidden (..., C) through the projection weight (V, C), shaped like targets,
    0 where targets == ignore_index. Only the kept positions go through the projection (for DPO,
    the answer tokens: the prompt and padding cost no logits)."""
    chunk = chunk or default_chunk(weight.shape[0], hidden.device)
    flat_t = targets.flatten()
    keep = (flat_t != ignore_index).nonzero().squeeze(1)  # one host sync on GPU: the kept count sizes the work
    picked = LinearTargetLogProbs.apply(hidden.flatten(0, -2)[keep], weight, flat_t[keep], chunk)
    out = torch.zeros(flat_t.shape, dtype=picked.dtype, device=picked.device)
    return out.index_put((keep,), picked).view(targets.shape)
