"""The one generation engine: the generate stage, chat, the server and evaluation all call it.

`Engine` holds a preallocated KV cache of `max_batch` rows. A request joins a free row (its prompt
is prefilled into that row; requests joining together share one prefill forward), then every
`step()` decodes one token for all active rows in a single batched forward, each row at its own
position; a finished request frees its row at once
and the next one can join while the others keep decoding (continuous batching). Idle rows sit at
position -1 and cost nothing but their share of the batched matmuls.

Costs per decode step: one forward of B tokens; attention reads only the slots below the highest
active position (full cache) or the window (rolling buffer).

`compile=True` runs the decode step through `torch.compile` (gpt-fast style): one static-shape
step over all `max_batch` rows and the whole cache (idle rows at position -1, unused slots masked),
traced once on the first step, so eager PyTorch's per-op dispatch (a few thousand small ops per
step for a 30-layer model) becomes a few fused kernels around the same matmuls (a packed model's
oneDNN products included, see openmill/packed.py). It pays where `max_len` is short (batch jobs):
with a long context the full-cache attention costs more than it saves. SmolLM2-135M on 2 CPU
cores, packed weights, 32 new tokens: 36.6 vs 28.9 tok/s eager at batch 1, 227 vs 198 at batch 8,
after 18 s of compilation (benchmarks/inference.md). The prefill stays eager (its length varies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from openmill.generate.sampling import SamplingParams, choose
from openmill.generate.stream import TextStream
from openmill.model import KVCache, Transformer


def _step_all_rows(model: Transformer, cache: KVCache, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Next-token logits (rows, V) of one decode step over every row and the whole cache."""
    return model(idx, pos=pos, cache=cache)[:, -1]


# One compiled function for every engine: a new engine of the same shapes reuses the traced step.
_compiled_step = torch.compile(_step_all_rows, dynamic=False)


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
        compile: bool = False,
    ):
        """max_len: positions per row (prompt + generation), at most the model's max_seq_len.
        compile: decode steps through torch.compile (see the module docstring); the first step
        pays the compilation."""
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        dtype = model.embed_tokens.weight.dtype
        self.cache = KVCache(model.cfg, max_batch, self.max_len, dtype=dtype, device=self.device)
        self.rows: list[Request | None] = [None] * max_batch
        self.decode = decode
        self.compile = compile

    # ------------------------------------------------------------------ requests

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    def add(self, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> Request:
        """Prefill `prompt` into a free row and sample its first token (which may already finish it)."""
        return self.add_many([prompt], [params], stop_ids)[0]

    @torch.no_grad()
    def add_many(self, prompts: list[list[int]], params: list[SamplingParams], stop_ids: Sequence[int] = ()) -> list[Request]:
        """Prefill several prompts into free rows, each run of adjacent rows in one forward (one
        read of the weights instead of one per prompt), and sample their first tokens. If any of
        them fails (a forward, a sampling), every row taken here is freed before the error goes up."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params: give one per prompt")
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt: give at least one token (e.g. BOS)")
            if len(prompt) >= self.max_len:
                raise PromptTooLong(f"prompt of {len(prompt)} tokens leaves no room under the context of {self.max_len}")
        free = [i for i, r in enumerate(self.rows) if r is None]
        if len(prompts) > len(free):  # callers check free_rows first
            raise ValueError(f"{len(prompts)} prompts for {len(free)} free rows")
        seqs = [
            Request(
                prompt=list(prompt),
                params=p,
                stop_ids=frozenset(stop_ids),
                generator=torch.Generator(device=self.device).manual_seed(p.seed),
                stream=TextStream(self.decode, p.stop) if self.decode else None,
                row=row,
            )
            for row, prompt, p in zip(free[: len(prompts)], prompts, params, strict=True)
        ]
        try:
            run = 0
            for i in range(1, len(seqs) + 1):
                if i == len(seqs) or seqs[i].row != seqs[i - 1].row + 1:
                    self._prefill(seqs[run:i])
                    run = i
        except Exception:
            # The caller never gets these requests: a row left holding one (without a first token,
            # or with nobody to read it) would break or waste every later step.
            for seq in seqs:
                self.cancel(seq)
            raise
        return seqs

    def _prefill(self, seqs: list[Request]) -> None:
        """Prefill adjacent rows in one forward. Prompts are left-padded, the padding at position -1
        (written to the sink slot, attended by nothing), so every row's last column is its last
        prompt token and the output head runs on that column only."""
        rows = slice(seqs[0].row, seqs[-1].row + 1)
        width = max(len(s.prompt) for s in seqs)
        self.cache.reset(rows)
        idx = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in seqs], device=self.device)
        pos = torch.tensor([[-1] * (width - len(s.prompt)) + list(range(len(s.prompt))) for s in seqs], device=self.device)
        logits = self.model(idx, pos=pos, cache=self.cache.view(rows, below=width), last_only=True)[:, -1]
        for seq, row_logits in zip(seqs, logits, strict=True):
            self.rows[seq.row] = seq
            if seq.params.max_new_tokens == 0:
                self._finish(seq, "length")
            else:
                self._accept(seq, row_logits)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every active row in one forward; return the rows that advanced."""
        live = [s for s in self.rows if s is not None]
        if not live:
            return []
        # Rows are taken lowest first, so the active ones are packed; a compiled step takes them all.
        n = len(self.rows) if self.compile else max(s.row for s in live) + 1
        idx = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.full((n, 1), -1, dtype=torch.long)
        for s in live:
            idx[s.row, 0], pos[s.row, 0] = s.tokens[-1], s.next_pos
        idx, pos = idx.to(self.device), pos.to(self.device)
        if self.compile:
            logits = _compiled_step(self.model, self.cache, idx, pos)
        else:
            below = max(s.next_pos for s in live) + 1
            logits = self.model(idx, pos=pos, cache=self.cache.view(slice(0, n), below=below))[:, -1]
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
    compile: bool = False,
) -> list[Request]:
    """Generate for every prompt (different lengths welcome), up to `max_batch` rows at a time;
    results in prompt order. Sampled tokens do not depend on the batching (one generator each).
    compile: torch.compile the decode step (Engine's docstring)."""
    if not prompts:
        return []
    params = params if isinstance(params, list) else [params] * len(prompts)
    longest = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params, strict=True))
    engine = Engine(model, max_batch=min(max_batch or len(prompts), len(prompts)), max_len=longest, decode=decode, compile=compile)
    waiting = list(zip(prompts, params))[::-1]
    results: list[Request] = []
    while waiting or engine.active:
        joining = [waiting.pop() for _ in range(min(engine.free_rows, len(waiting)))]
        if joining:
            results += engine.add_many([prompt for prompt, _ in joining], [p for _, p in joining], stop_ids)
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
