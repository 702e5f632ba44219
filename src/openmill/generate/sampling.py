"""Choosing the next token: repetition penalty -> temperature -> top-k -> top-p, or greedy.

Every request carries its own `SamplingParams` and its own seeded torch.Generator, so a batch can
mix greedy and sampled requests and each one is reproducible whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = 0.95
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL)
    seed: int = 0
    stop: tuple[str, ...] = ()  # strings that end the generation (not included in the text)

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 0,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k is None or self.top_k > 0,
            "top_p": self.top_p is None or 0 <= self.top_p <= 1,  # 0: the most likely token only
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), seen: ids (N,). A seen token's logit is divided by `penalty` if positive, else
    multiplied (as transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


# Below this temperature sampling is greedy: dividing fp32 logits by, say, 1e-40 overflows to inf and
# softmax turns that into nan probabilities, which torch.multinomial refuses.
GREEDY_BELOW_TEMPERATURE = 1e-5


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,); greedy at temperature 0, and below GREEDY_BELOW_TEMPERATURE.
    top_p 0 keeps only the most likely token, which is greedy too (the nucleus filter below would
    drop every token, even the first, and softmax over all -inf is nan)."""
    if temperature < GREEDY_BELOW_TEMPERATURE or top_p == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs_sorted = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator) -> int:
    """One request's next token from its last logits (V,)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return int(sample_next(logits[None], params.temperature, params.top_k, params.top_p, generator)[0])
