"""The mixture sampler draws every window of a domain, the last one included."""

import numpy as np

from openmill.data.mixture import MixtureSampler


class ArrayShards:
    """A domain's tokens held in memory, with TokenShards' read interface."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.n_tokens = len(tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.n_tokens, (start, length)
        return self.tokens[start : start + length]


def test_every_start_is_drawn_and_every_token_is_a_target():
    shards = {"a": ArrayShards(np.arange(10)), "b": ArrayShards(np.arange(100, 125))}
    sampler = MixtureSampler(shards, {"a": 1.0, "b": 1.0}, seq_len=4, seed=0)
    starts = {0: set(), 1: set()}
    targets = set()
    for step in range(300):
        domains, rows = sampler.global_batch(step, batch_size=8)
        for d, s in zip(domains, rows):
            starts[int(d)].add(int(s))
        _, y, _ = sampler.batch(step, batch_size=8)
        targets |= set(y.flatten().tolist())
    assert starts == {0: set(range(6)), 1: set(range(21))}  # n - seq_len starts each
    assert {9, 124} <= targets  # each domain's last token is predicted
