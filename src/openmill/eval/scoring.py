"""Log-likelihood of continuations, with every context computed once for all of its choices.

One record with context C and choices X1..Xn becomes ONE row: C X1 X2 .. Xn, where each Xi sits
at the positions right after C (its RoPE positions restart at len(C)) and attends to C and to
itself only (a tree mask). A 4-choice question costs len(C) + sum len(Xi) tokens instead of
4 * len(C) + sum len(Xi). Rows are sorted by length and batched (right padding, masked), and the
output projection runs only at the positions that predict a continuation token, so no
(B, T, vocab) logits tensor is ever built. Per-row positions and masks need the model's layers
called directly: embed_tokens -> layers(x, cos, sin, pos, cache=None, mask) -> norm -> lm_head
(the layer signature of openmill.model.Block).

The tokenization follows lm-evaluation-harness's `_encode_pair`: trailing whitespace of the
context moves to the continuation, the continuation's ids are those of encode(context +
continuation) after len(encode(context)), and the model sees encode(context) + those ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openmill.model import Transformer


@dataclass
class Group:
    """A context and the continuations scored after it (token ids)."""

    context: list[int]
    continuations: list[list[int]]

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) for c in self.continuations)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids) :]


def truncate(group: Group, max_len: int) -> Group:
    """Keep the context's last tokens so context + the longest continuation fits max_len positions."""
    longest = max(len(c) for c in group.continuations)
    if longest >= max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit max_seq_len {max_len}")
    keep = max_len - longest
    return Group(group.context[-keep:], group.continuations) if len(group.context) > keep else group


@torch.no_grad()
def _score_batch(model: Transformer, groups: list[Group], pad_id: int) -> list[list[tuple[float, bool]]]:
    device = model.embed_tokens.weight.device
    B, T = len(groups), max(len(g) for g in groups)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # 0 = context, i + 1 = continuation i, -1 = padding
    rows, cols, targets, owners = [], [], [], []  # where each continuation token is predicted
    for b, g in enumerate(groups):
        n = len(g.context)
        idx[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(g.context), torch.arange(n), 0
        start = n
        for i, cont in enumerate(g.continuations):
            k = len(cont)
            idx[b, start : start + k] = torch.tensor(cont)
            pos[b, start : start + k] = torch.arange(n, n + k)
            seg[b, start : start + k] = i + 1
            predictors = [n - 1] + list(range(start, start + k - 1))
            rows += [b] * k
            cols += predictors
            targets += cont
            owners += [(b, i)] * k
            start += k
    # A query attends to earlier positions of the context and of its own continuation. Padding
    # queries (segment -1) see position 0 of the context, so no softmax row is empty.
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = same & (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] != -1)
    if model.cfg.sliding_window is not None:
        mask &= (pos[:, :, None] - pos[:, None, :]) < model.cfg.sliding_window
    idx, pos, mask = idx.to(device), pos.to(device), mask[:, None].to(device)
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, T, D)
    x = model.embed_tokens(idx)
    for layer in model.layers:
        x = layer(x, cos, sin, pos, None, mask)
    h = model.norm(x[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])  # (N, dim)
    logits = model.lm_head(h).float()  # (N, vocab): only the positions that predict a scored token
    target = torch.tensor(targets, device=device)
    logprob = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    greedy = logits.argmax(dim=-1) == target
    out = [[[0.0, True] for _ in g.continuations] for g in groups]
    for (b, i), lp, ok in zip(owners, logprob.tolist(), greedy.tolist()):
        out[b][i][0] += lp
        out[b][i][1] &= ok
    return [[(lp, ok) for lp, ok in g] for g in out]


def score_groups(
    model: Transformer, groups: list[Group], pad_id: int, batch_size: int = 16, max_tokens: int = 16384, progress=None
) -> list[list[tuple[float, bool]]]:
    """(sum of log-probabilities, every token greedy) of each continuation of each group.

    Longest rows first (a memory problem shows at once); a batch also closes once it would hold
    `max_tokens` padded tokens. `progress(n)` is called after each batch with its group count.
    """
    max_len = model.cfg.max_seq_len
    groups = [truncate(g, max_len) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i]))
    results: list = [None] * len(groups)
    start = 0
    while start < len(order):
        width = len(groups[order[start]])
        size = max(1, min(batch_size, max_tokens // max(width, 1)))
        chunk = order[start : start + size]
        for i, r in zip(chunk, _score_batch(model, [groups[i] for i in chunk], pad_id)):
            results[i] = r
        if progress is not None:
            progress(len(chunk))
        start += size
    return results


@torch.no_grad()
def rolling_nll(model: Transformer, ids: list[int], prefix_id: int) -> float:
    """Sum of negative log-likelihoods of every token of a document, in disjoint windows of
    max_seq_len tokens, each window conditioned on the token before it (`prefix_id` for the first),
    as lm-evaluation-harness's loglikelihood_rolling does."""
    device = model.embed_tokens.weight.device
    L = model.cfg.max_seq_len
    seq = [prefix_id] + ids
    total = 0.0
    for start in range(0, len(ids), L):
        window = seq[start : start + L + 1]
        inp, tgt = torch.tensor([window[:-1]], device=device), torch.tensor([window[1:]], device=device)
        total += float(model(inp, targets=tgt)) * tgt.numel()
    return total
