"""Text generation with a KV cache: prefill the prompt once, then decode one token at a time.

Sampling is temperature -> top-k -> top-p (nucleus) on the last position's logits; temperature 0
is greedy. A torch.Generator seeded per call makes sampling reproducible.
"""

from __future__ import annotations

import torch

from openmill.model import KVCache, Transformer


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Generated token ids (without the prompt), stopping early at any of `stop_ids`."""
    device = model.embed_tokens.weight.device
    max_len = min(model.cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_seq_len {model.cfg.max_seq_len}")
    cache = KVCache(model.cfg, 1, max_len, dtype=model.embed_tokens.weight.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    idx = torch.tensor([prompt_ids], device=device)
    pos = torch.arange(len(prompt_ids), device=device)
    out: list[int] = []
    try:
        logits = model(idx, pos=pos, cache=cache)[:, -1]
        for p in range(len(prompt_ids), max_len):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(int(token))
            if out[-1] in stop_ids or p + 1 >= max_len:
                break
            logits = model(token.view(1, 1), pos=torch.tensor([p], device=device), cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return out
