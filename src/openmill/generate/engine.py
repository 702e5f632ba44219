"""The one generation engine: the generate stage, chat, the server and evaluation all call it.

`Engine` holds a preallocated KV cache of `max_batch` rows. A request joins a free row (its prompt
is prefilled into that row alone), then every `step()` decodes one token for all active rows in a
single batched forward, each row at its own position; a finished request frees its row at once
and the next one can join while the others keep decoding (continuous batching). Idle rows sit at
position -1 and cost nothing but their share of the batched matmuls.

Costs per decode step: one forward of B tokens; attention reads only the slots below the highest
active position (full cache) or the window (rolling buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from openmill.generate.sampling import SamplingParams, choose
from openmill.generate.stream import TextStream
from openmill.model import KVCache, Transformer


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the engine's context."""


@dataclass
class Request:
    """One request in flight."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    stream: TextStream | None
    row: int = -1
    tokens: list[int] = field(default_factory=list)  # generated ids (a stop id included, if hit)
    text: str = ""  # released text (stop strings cut), when a decoder was given
    delta: str = ""  # text released by the last step
    finish_reason: str | None = None  # "stop" or "length" once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_pos(self) -> int:
        return len(self.prompt) + len(self.tokens) - 1  # position of the last sampled token


class Engine:
    def __init__(
        self,
        model: Transformer,
        max_batch: int = 8,
        max_len: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ):
        """max_len: positions per row (prompt + generation), at most the model's max_seq_len."""
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        dtype = model.embed_tokens.weight.dtype
        self.cache = KVCache(model.cfg, max_batch, self.max_len, dtype=dtype, device=self.device)
        self.rows: list[Request | None] = [None] * max_batch
        self.decode = decode

    # ------------------------------------------------------------------ requests

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    @torch.no_grad()
    def add(self, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> Request:
        """Prefill `prompt` into a free row and sample its first token (which may already finish it)."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token (e.g. BOS)")
        if len(prompt) >= self.max_len:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens leaves no room under the context of {self.max_len}")
        row = self.rows.index(None)  # ValueError when full: callers check free_rows first
        seq = Request(
            prompt=list(prompt),
            params=params,
            stop_ids=frozenset(stop_ids),
            generator=torch.Generator(device=self.device).manual_seed(params.seed),
            stream=TextStream(self.decode, params.stop) if self.decode else None,
            row=row,
        )
        self.cache.reset(row)
        idx = torch.tensor([prompt], device=self.device)
        pos = torch.arange(len(prompt), device=self.device)[None]
        logits = self.model(idx, pos=pos, cache=self.cache.view(slice(row, row + 1), below=len(prompt)))[0, -1]
        self.rows[row] = seq
        if params.max_new_tokens == 0:
            self._finish(seq, "length")
        else:
            self._accept(seq, logits)
        return seq

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every active row in one forward; return the rows that advanced."""
        live = [s for s in self.rows if s is not None]
        if not live:
            return []
        n = max(s.row for s in live) + 1  # rows are taken lowest first, so the active ones are packed
        idx = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.full((n, 1), -1, dtype=torch.long)
        for s in live:
            idx[s.row, 0], pos[s.row, 0] = s.tokens[-1], s.next_pos
        below = max(s.next_pos for s in live) + 1
        cache = self.cache.view(slice(0, n), below=below)
        logits = self.model(idx.to(self.device), pos=pos.to(self.device), cache=cache)[:, -1]
        for s in live:
            self._accept(s, logits[s.row])
        return live

    def cancel(self, seq: Request | None) -> None:
        """Stop a request now (its client went away) and free its row."""
        if seq is not None and not seq.done:
            seq.finish_reason = "cancelled"
            self.rows[seq.row] = None

    def _accept(self, seq: Request, logits: torch.Tensor) -> None:
        seen = torch.tensor(seq.prompt + seq.tokens, device=logits.device) if seq.params.repetition_penalty != 1.0 else None
        token = choose(logits, seq.params, seen if seen is not None else torch.empty(0, dtype=torch.long), seq.generator)
        seq.tokens.append(token)
        seq.delta = ""
        if token in seq.stop_ids:
            return self._finish(seq, "stop")
        if seq.stream is not None:
            seq.delta = seq.stream.push(token)
            seq.text = seq.stream.text
            if seq.stream.stopped:
                return self._finish(seq, "stop")
        if len(seq.tokens) >= seq.params.max_new_tokens or seq.next_pos + 1 >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Request, reason: str) -> None:
        if seq.stream is not None:
            seq.delta += seq.stream.finish()
            seq.text = seq.stream.text
        seq.finish_reason = reason
        self.rows[seq.row] = None


def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    stop_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    max_batch: int | None = None,
) -> list[Request]:
    """Generate for every prompt (different lengths welcome), up to `max_batch` rows at a time;
    results in prompt order. Sampled tokens do not depend on the batching (one generator each)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    longest = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params, strict=True))
    engine = Engine(model, max_batch=min(max_batch or len(prompts), len(prompts)), max_len=longest, decode=decode)
    waiting = list(zip(prompts, params))[::-1]
    results: list[Request] = []
    while waiting or engine.active:
        while waiting and engine.free_rows:
            prompt, p = waiting.pop()
            results.append(engine.add(prompt, p, stop_ids))
        engine.step()
    return results


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    repetition_penalty: float = 1.0,
) -> list[int]:
    """Generated token ids for one prompt (without the prompt), stopping early at any of `stop_ids`."""
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    if max_new_tokens <= 0:
        raise PromptTooLong(f"prompt of {len(prompt_ids)} tokens leaves no room under max_seq_len {model.cfg.max_seq_len}")
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    was_training = model.training
    try:
        return generate_batch(model, [prompt_ids], params, stop_ids)[0].tokens
    finally:
        model.train(was_training)
