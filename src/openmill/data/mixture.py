"""Sampling training windows from per-domain token shards by mixture weights.

The batch of step s is a pure function of (seed, s, weights): every global row draws its domain
and its offset from a generator seeded by (seed, s). Resuming at any step therefore needs only the
weights, and a run can change its number of processes without changing what it trains on: rank r
of w takes rows [r*B/w, (r+1)*B/w) of the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch

from openmill.data.shards import TokenShards


class MixtureSampler:
    def __init__(self, shards: dict[str, TokenShards], weights: dict[str, float], seq_len: int, seed: int):
        self.domains = list(shards)
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        for name, s in shards.items():
            if s.n_tokens < seq_len + 1:
                raise ValueError(f"domain {name!r}: {s.n_tokens} training tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the mixture from the next batch on (the data unit of HeuriMentor calls this)."""
        total = sum(weights.get(d, 0.0) for d in self.domains)
        if total <= 0:
            raise ValueError("mixture weights sum to zero")
        self.weights = {d: weights.get(d, 0.0) / total for d in self.domains}

    def global_batch(self, step: int, batch_size: int, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(domain index per row, start offset per row) for the whole global batch of `step`.

        `seq_len` (at most the sampler's) lets a training phase use shorter windows."""
        seq_len = seq_len or self.seq_len
        rng = np.random.default_rng([self.seed, step])
        p = np.array([self.weights[d] for d in self.domains])
        domain_idx = rng.choice(len(self.domains), size=batch_size, p=p)
        # One uniform draw per row, scaled to that row's domain length: no per-row generator needed.
        # A row reads seq_len + 1 tokens, so a domain of n tokens has n - seq_len starts.
        u = rng.random(batch_size)
        limits = np.array([self.shards[self.domains[i]].n_tokens - seq_len for i in domain_idx])
        starts = (u * limits).astype(np.int64)
        return domain_idx, starts

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, seq_len: int | None = None):
        """This rank's rows of step `step`: inputs (b, T), targets (b, T), domain index (b,), as int64 tensors."""
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world} processes")
        seq_len = seq_len or self.seq_len
        domain_idx, starts = self.global_batch(step, batch_size, seq_len)
        lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world
        rows = np.stack(
            [self.shards[self.domains[d]].read(int(s), seq_len + 1) for d, s in zip(domain_idx[lo:hi], starts[lo:hi])]
        )
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:], torch.from_numpy(domain_idx[lo:hi].astype(np.int64))

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.set_weights(state["weights"])
