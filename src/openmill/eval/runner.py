"""Evaluate one model folder on a list of tasks: prompts -> token ids -> scores -> metrics.

Choice and cloze tasks go through scoring.score_groups (one batched pass, shared contexts);
generative tasks decode greedily with openmill.generate (the inference engine serving uses);
perplexity tasks score whole documents in max_seq_len windows. Tasks whose data files are absent
(CMMLU and C-Eval are never shipped) are skipped with a message, not failed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from openmill.eval.data import read_records
from openmill.eval.metrics import aggregate, choice_scores, generate_scores
from openmill.eval.prompts import Prompt, build_prompts
from openmill.eval.scoring import Group, encode_pair, rolling_nll, score_groups
from openmill.eval.tasks import TaskError, TaskSpec
from openmill.generate import generate
from openmill.textmodel import TextTokenizer, load_text_model


@dataclass
class Options:
    data_dir: Path = Path("../shared/data")
    batch_size: int = 16
    limit: int | None = None  # first N records of each task
    chat: bool = False  # prompts through the model's chat template (instruction-tuned models)
    seed: int = 1234  # few-shot sampling
    shots: dict[str, int | None] = field(default_factory=dict)  # task -> few-shot count override


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    n: int
    shots: int
    seconds: float
    records: list[dict]  # per record: index, scores, and lls (choice tasks) or output (generative)


class Encoder:
    """Prompts to ids for one model: after the folder's document prefix, or as the one user message
    of its chat template. Chat goes through TextTokenizer's chat encoding: the template's markers
    are special tokens, while marker text in a question or an answer stays text (it cannot forge a
    turn)."""

    def __init__(self, tok: TextTokenizer, chat: bool):
        self.tok, self.chat = tok, chat
        self.prefix = [] if chat else tok.document_prefix()
        # What an empty context is conditioned on (lm-evaluation-harness: BOS, else EOS).
        self.start_id = self.prefix[-1] if self.prefix else (tok.bos_id if tok.bos_id is not None else tok.eos_id)

    def prompt(self, context: str) -> list[int]:
        """The ids a generation continues (chat: ending with the template's assistant header)."""
        if self.chat:
            return self.tok.encode_chat([{"role": "user", "content": context}], add_generation_prompt=True)
        return self.prefix + self.tok.encode(context)

    def group(self, context: str, continuations: list[str]) -> Group:
        encode = self.prompt
        if self.chat:  # the assistant's answer starts right after the template's header
            messages = [{"role": "user", "content": context}]
            context = self.tok.render_chat(messages, add_generation_prompt=True)
            encode = partial(self.tok.encode_rendered, messages, add_generation_prompt=True)
            continuations = [c.lstrip(" ") for c in continuations]
        if not context:
            return Group([self.start_id], [self.tok.encode(c) for c in continuations])
        pairs = [encode_pair(encode, context, c) for c in continuations]
        return Group(pairs[0][0], [p[1] for p in pairs])


def _groups(prompts: list[Prompt], enc: Encoder) -> tuple[list[Group], list[tuple[int, int]]]:
    """Flattened groups and, per group, (prompt number, first choice number)."""
    groups, owners = [], []
    for n, p in enumerate(prompts):
        if len(p.contexts) == 1:
            groups.append(enc.group(p.contexts[0], p.continuations))
            owners.append((n, 0))
        else:  # partial scoring: one group per (context, continuation)
            for i, (ctx, cont) in enumerate(zip(p.contexts, p.continuations)):
                groups.append(enc.group(ctx, [cont]))
                owners.append((n, i))
    return groups, owners


def greedy_until(model, tok: TextTokenizer, ids: list[int], max_new: int, until: list[str]) -> str:
    """The greedy completion of `ids`, cut at the first of `until`. The context keeps its last
    tokens, leaving room for `max_new` (itself capped so at least one context token stays)."""
    max_new = min(max_new, model.cfg.max_seq_len - 1)
    out = generate(model, ids[-(model.cfg.max_seq_len - max_new) :], max_new, temperature=0.0, stop_ids=tok.stop_ids)
    text = tok.decode(out)
    for stop in until:
        text = text.split(stop)[0]
    return text


def run_task(model, tok: TextTokenizer, spec: TaskSpec, opts: Options, progress: Progress | None = None) -> TaskResult:
    started = time.time()
    records = read_records(spec.data, spec.resolve(spec.data.path, opts.data_dir), spec.name)
    shots = opts.shots.get(spec.name)
    shots = spec.fewshot.count if shots is None else shots
    pool = None
    if shots and spec.fewshot.data is not None:
        pool = read_records(spec.fewshot.data, spec.resolve(spec.fewshot.data.path, opts.data_dir), spec.name)
    prompts = build_prompts(spec, records, pool, shots, opts.seed, opts.limit)
    enc = Encoder(tok, opts.chat)
    bar = progress.add_task(spec.name, total=len(prompts)) if progress is not None else None
    advance = (lambda n: progress.advance(bar, n)) if progress is not None else None
    per_record, rows, extra = [], [], {}

    if spec.kind in ("multiple_choice", "cloze"):
        groups, owners = _groups(prompts, enc)
        if progress is not None:
            progress.update(bar, total=len(groups))
        scores = score_groups(model, groups, tok.pad_id, batch_size=opts.batch_size, progress=advance)
        lls: dict[int, list] = {}
        for (n, _), s in zip(owners, scores):
            lls.setdefault(n, []).extend(s)
        for n, p in enumerate(prompts):
            values = [ll for ll, _ in lls[n]]
            if spec.kind == "cloze":
                score = {"acc": float(lls[n][0][1]), "ll": values[0]}
            else:
                score = choice_scores(values, p.choices, p.gold, spec.metrics)
            per_record.append(score)
            rows.append({"index": p.index, "lls": values, **score})
    elif spec.kind in ("generate", "strict_choice"):
        for p in prompts:
            output = greedy_until(model, enc.tok, enc.prompt(p.contexts[0]), spec.max_new_tokens, spec.until)
            if spec.kind == "generate":
                score = generate_scores(output, p.gold, spec.extract, spec.ignore, spec.metrics)
            else:
                score = {"exact_letter": float(output.strip() == p.choices[p.gold])}
            per_record.append(score)
            rows.append({"index": p.index, "output": output, **score})
            if advance is not None:
                advance(1)
    else:  # perplexity
        import math

        nll = words = nbytes = 0
        for p in prompts:
            doc = p.contexts[0]
            nll += rolling_nll(model, tok.encode(doc), enc.start_id)
            words += len(re.split(r"\s+", doc))  # lm-eval's word count (a leading/trailing space counts)
            nbytes += len(doc.encode("utf-8"))
            if advance is not None:
                advance(1)
        extra = {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / nbytes), "bits_per_byte": nll / nbytes / math.log(2)}
        extra = {k: v for k, v in extra.items() if k in spec.metrics}

    metrics = aggregate(per_record, extra)
    metrics = {k: v for k, v in metrics.items() if k in spec.metrics}
    return TaskResult(spec.name, metrics, len(prompts), shots, time.time() - started, rows)


def evaluate(model_dir: Path, tasks: list[TaskSpec], opts: Options, device: str = "auto", log=print) -> list[TaskResult]:
    """Every task on one model folder; tasks whose data is absent are skipped with a message."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, tok = load_text_model(model_dir, device=device)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        for spec in tasks:
            try:
                results.append(run_task(model, tok, spec, opts, progress))
            except TaskError as e:
                if "data file not found" not in str(e):
                    raise
                log(f"[eval] skipped {spec.name}: {e}")
    return results
