"""Validation bits per byte of a token n-gram count model, next to the network a run trained.

A baseline for the demo's bits-per-byte table: counts of every n-gram of the run's own training
shards, interpolated with absolute discounting (discount 0.75) down to a uniform guess over the
vocabulary, scored on the whole validation split with pretraining's bits-per-byte rule (targets
that are special tokens carry no bytes and are left out). It says how much of the held-out text is
phrases already seen in training, which a small network may fail to store.

    .venv/bin/python benchmarks/ngram_baseline.py runs/tiny --domain zh --order 2 3 4
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from pathlib import Path

from openmill.data.shards import TokenShards
from openmill.tokenizer import Tokenizer

DISCOUNT = 0.75


class NGramModel:
    def __init__(self, tokens: list[int], order: int, vocab_size: int):
        self.order, self.vocab_size = order, vocab_size
        # counts[k][context of k tokens] = Counter of the next token
        self.counts = [defaultdict(Counter) for _ in range(order)]
        for i, token in enumerate(tokens):
            for k in range(min(order, i + 1)):
                self.counts[k][tuple(tokens[i - k : i])][token] += 1
        self.totals = [{ctx: sum(c.values()) for ctx, c in level.items()} for level in self.counts]

    def prob(self, context: list[int], token: int) -> float:
        p = 1.0 / self.vocab_size
        for k in range(min(self.order, len(context) + 1)):
            ctx = tuple(context[len(context) - k :])
            seen = self.counts[k].get(ctx)
            if not seen:
                break  # a longer context was never seen either
            total = self.totals[k][ctx]
            p = max(seen.get(token, 0) - DISCOUNT, 0) / total + DISCOUNT * len(seen) / total * p
        return p


def bits_per_byte(model: NGramModel, tokens: list[int], token_bytes) -> float:
    nats, nbytes = 0.0, 0
    for i in range(1, len(tokens)):
        if token_bytes[tokens[i]] == 0:
            continue
        nats -= math.log(model.prob(tokens[max(0, i - model.order + 1) : i], tokens[i]))
        nbytes += int(token_bytes[tokens[i]])
    return nats / math.log(2) / nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory with tokenizer/ and tokens/")
    ap.add_argument("--domain", nargs="+", default=["en", "zh", "code"])
    ap.add_argument("--order", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    tok = Tokenizer.load(args.run / "tokenizer" / "tokenizer.json")
    token_bytes = tok.token_bytes()
    print("| domain | n | bpb |\n|---|---:|---:|")
    for domain in args.domain:
        train, valid = (TokenShards(args.run / "tokens" / domain / split) for split in ("train", "valid"))
        train_ids, valid_ids = train.read(0, train.n_tokens).tolist(), valid.read(0, valid.n_tokens).tolist()
        for order in args.order:
            model = NGramModel(train_ids, order, tok.vocab_size)
            print(f"| {domain} | {order} | {bits_per_byte(model, valid_ids, token_bytes):.4f} |")


if __name__ == "__main__":
    main()
