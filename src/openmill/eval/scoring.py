"""Log-likelihood of continuations, with every context computed once for all of its choices.

One record with context C and choices X1..Xn becomes ONE group of tokens: C X1 X2 .. Xn, where
each Xi sits at the positions right after C (its RoPE positions restart at len(C)) and attends to
C and to itself only (a tree mask). A 4-choice question costs len(C) + sum len(Xi) tokens instead
of 4 * len(C) + sum len(Xi). Groups are sorted by length, batched, and packed several to a row
(first fit; each group attends only to itself; the row width is chosen by `plan_rows`), so a batch
is not padded to its longest group: on the 72 records of benchmarks/eval.md padding was 40% of
the tokens a batch computed, packed it is 5%. The output projection runs only at the positions
that predict a continuation token, so no (B, T, vocab) logits tensor is ever built. Per-row
positions and masks need the model's layers called directly: embed_tokens -> layers(x, cos, sin,
pos, cache=None, mask) -> norm -> lm_head (the layer signature of openmill.model.Block).

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


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Groups (by index) per row of at most `width` tokens, first fit in decreasing length."""
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r in range(len(rows)) if used[r] + lengths[i] <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += lengths[i]
    return rows


def plan_rows(model: Transformer, lengths: list[int]) -> list[list[int]]:
    """The packing with the fewest estimated multiply-adds. Every padded token costs the layers'
    matmuls; every query also costs attention over the whole row (an explicit mask computes masked
    keys too). Rows as long as the longest group waste padding, very wide rows make attention
    quadratic; widths from the longest group to 8x it are tried in steps of a quarter of it.
    (Weighting attention 3x, for the CPU kernel's lower rate, measured slower: benchmarks/eval.md.)"""
    per_token = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    per_key = 2 * model.cfg.n_heads * model.cfg.head_dim  # q.k and attention-weighted v
    longest = max(lengths)
    best, best_cost = None, None
    for width in range(longest, min(sum(lengths), 8 * longest) + 1, max(1, longest // 4)):
        rows = pack_rows(lengths, width)
        T = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * T * (per_token + per_key * T)
        if best_cost is None or cost < best_cost:
            best, best_cost = rows, cost
        if len(rows) == 1:  # wider rows change nothing
            break
    return best


@torch.no_grad()
def _score_batch(model: Transformer, groups: list[Group], pad_id: int) -> list[list[tuple[float, bool]]]:
    device = model.embed_tokens.weight.device
    packed = plan_rows(model, [len(g) for g in groups])
    B, T = len(packed), max(sum(len(groups[i]) for i in row) for row in packed)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # which group of the batch; -1 = padding
    seg = torch.full((B, T), -1, dtype=torch.long)  # 0 = context, i + 1 = continuation i
    rows, cols, targets, owners = [], [], [], []  # where each continuation token is predicted
    for b, row in enumerate(packed):
        start = 0
        for j in row:
            g = groups[j]
            n = len(g.context)
            idx[b, start : start + n], pos[b, start : start + n] = torch.tensor(g.context), torch.arange(n)
            doc[b, start : start + n], seg[b, start : start + n] = j, 0
            last_context, start = start + n - 1, start + n
            for i, cont in enumerate(g.continuations):
                k = len(cont)
                idx[b, start : start + k] = torch.tensor(cont)
                pos[b, start : start + k] = torch.arange(n, n + k)
                doc[b, start : start + k], seg[b, start : start + k] = j, i + 1
                rows += [b] * k
                cols += [last_context, *range(start, start + k - 1)]
                targets += cont
                owners += [(j, i)] * k
                start += k
    # A query attends to earlier positions of its own group's context and of its own continuation.
    # Padding (doc -1, seg -1, position 0) attends only to padding, so no softmax row is empty.
    same_doc = doc[:, None, :] == doc[:, :, None]
    same_branch = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = same_doc & same_branch & (pos[:, None, :] <= pos[:, :, None])
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
    for (j, i), lp, ok in zip(owners, logprob.tolist(), greedy.tolist()):
        out[j][i][0] += lp
        out[j][i][1] &= ok
    return [[(lp, ok) for lp, ok in g] for g in out]


def score_groups(
    model: Transformer, groups: list[Group], pad_id: int, batch_size: int = 16, max_tokens: int = 16384, progress=None
) -> list[list[tuple[float, bool]]]:
    """(sum of log-probabilities, every token greedy) of each continuation of each group.

    Longest groups first (a memory problem shows at once); a batch holds up to `batch_size` groups
    and closes early once they would pass `max_tokens` tokens. `progress(n)` is called after each
    batch with its group count.
    """
    max_len = model.cfg.max_seq_len
    groups = [truncate(g, max_len) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i]))
    results: list = [None] * len(groups)
    start = 0
    while start < len(order):
        size, tokens = 0, 0
        while start + size < len(order) and size < batch_size:
            tokens += len(groups[order[start + size]])
            if size and tokens > max_tokens:
                break
            size += 1
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
    max_seq_len tokens scored once each, as lm-evaluation-harness's loglikelihood_rolling does:
    a full window is conditioned on the token before it (`prefix_id` for the first); the last,
    shorter one reads the max_seq_len tokens before its end and scores only its own."""
    device = model.embed_tokens.weight.device
    L = model.cfg.max_seq_len
    seq = [prefix_id] + ids  # seq[i] is the input that predicts ids[i]
    total = 0.0
    for start in range(0, len(ids), L):
        end = min(start + L, len(ids))
        lo = max(0, end - L)  # = start, except for a short last window, which keeps a full context
        inp = torch.tensor([seq[lo:end]], device=device)
        tgt = torch.tensor([[-100] * (start - lo) + ids[start:end]], device=device)
        total += float(model(inp, targets=tgt)) * (end - start)
    return total
