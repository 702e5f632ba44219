"""From records to prompts, exactly as lm-evaluation-harness builds them:

    context = description + (example + fewshot_delimiter) * count + text(record)
    example = text(example) + target_delimiter + answer(example)

and each answer scored as `target_delimiter + choice` after the context. In WinoGrande-style
partial scoring (`continuation` set on a choice task) each choice completes the context instead
and the one shared continuation is scored after it. Few-shot examples are drawn per record with
a seed derived from (seed, task, record index), so a record's prompt never depends on the order
or batch it is evaluated in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from openmill.eval.tasks import TaskError, TaskSpec, expression, template


@dataclass
class Prompt:
    """One record, ready to score: contexts[i] is followed by continuations[i] (one context for all
    choices in the usual case, one per choice in partial scoring)."""

    index: int
    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # answer strings (acc_norm / acc_bytes lengths), or [] when not a choice task
    gold: object  # int index, list of 0/1 labels (mc2) or answer string (generate)


def render(spec: TaskSpec, field: str, record: dict, where: str) -> str:
    try:
        return template(getattr(spec, field)).render(**record)
    except Exception as e:  # noqa: BLE001 (a template over user data can fail in many ways)
        raise TaskError(f"{where}: task {spec.name}: {field}: {type(e).__name__}: {e}") from None


def evaluate_expr(spec: TaskSpec, field: str, record: dict, where: str):
    try:
        return expression(getattr(spec, field))(**record)
    except Exception as e:  # noqa: BLE001
        raise TaskError(f"{where}: task {spec.name}: {field}: {type(e).__name__}: {e}") from None


def choices_and_gold(spec: TaskSpec, record: dict, where: str) -> tuple[list[str], object]:
    choices = evaluate_expr(spec, "choices", record, where) if spec.choices else []
    if spec.choices and (not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices)):
        raise TaskError(f"{where}: task {spec.name}: choices: expected a list of strings, got {choices!r}"[:300])
    gold = evaluate_expr(spec, "target", record, where) if spec.target else None
    if spec.kind in ("multiple_choice", "strict_choice") and "mc2" not in spec.metrics:
        if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
            gold = int(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskError(f"{where}: task {spec.name}: target: expected an index below {len(choices)}, got {gold!r}")
    return list(choices), gold


def _answer(spec: TaskSpec, record: dict, where: str) -> str:
    """An example's answer as shown in few-shot."""
    if spec.fewshot_target is not None:
        return render(spec, "fewshot_target", record, where)
    if spec.kind == "cloze":
        return render(spec, "continuation", record, where)
    choices, gold = choices_and_gold(spec, record, where)
    if spec.kind in ("multiple_choice", "strict_choice"):
        return choices[gold if isinstance(gold, int) else list(gold).index(1)]
    return str(gold)


def _example(spec: TaskSpec, record: dict, where: str) -> str:
    if spec.kind == "multiple_choice" and spec.continuation is not None:
        choices, gold = choices_and_gold(spec, record, where)
        return choices[gold] + spec.target_delimiter + render(spec, "continuation", record, where)
    return render(spec, "text", record, where) + spec.target_delimiter + _answer(spec, record, where)


def fewshot_prefix(spec: TaskSpec, record: dict, index: int, pool: list[dict], same_pool: bool, count: int, seed: int) -> str:
    """description + the few-shot examples, each followed by the few-shot delimiter."""
    description = render(spec, "description", record, f"{spec.source}") if spec.description else ""
    if count == 0:
        return description
    candidates = [(i, r) for i, r in enumerate(pool) if not (same_pool and i == index)]
    if spec.fewshot.match:
        key = record.get(spec.fewshot.match)
        candidates = [(i, r) for i, r in candidates if r.get(spec.fewshot.match) == key]
    if len(candidates) < count:
        raise TaskError(f"task {spec.name}: fewshot: {count} examples wanted, {len(candidates)} available for record {index}")
    if spec.fewshot.sampler == "random":
        candidates = random.Random(f"{seed}:{spec.name}:{index}").sample(candidates, count)
    examples = [_example(spec, r, f"fewshot record {i}") for i, r in candidates[:count]]
    return description + "".join(e + spec.fewshot.delimiter for e in examples)


def build_prompts(spec: TaskSpec, records: list[dict], pool: list[dict] | None, count: int, seed: int, limit: int | None) -> list[Prompt]:
    """Prompts for the first `limit` records; `pool` holds the few-shot examples (None: the records)."""
    same_pool = pool is None
    pool = records if pool is None else pool
    prompts = []
    for index, record in enumerate(records[:limit] if limit else records):
        where = f"{Path(spec.source).name}: record {index}"
        prefix = fewshot_prefix(spec, record, index, pool, same_pool, count, seed)
        choices, gold = choices_and_gold(spec, record, where)
        d = spec.target_delimiter
        if spec.kind == "multiple_choice" and spec.continuation is not None:
            cont = d + render(spec, "continuation", record, where)
            prompts.append(Prompt(index, [prefix + c for c in choices], [cont] * len(choices), choices, gold))
        elif spec.kind == "multiple_choice":
            prompts.append(Prompt(index, [prefix + render(spec, "text", record, where)], [d + c for c in choices], choices, gold))
        elif spec.kind == "cloze":
            cont = d + render(spec, "continuation", record, where)
            prompts.append(Prompt(index, [prefix + render(spec, "text", record, where)], [cont], [], None))
        elif spec.kind == "perplexity":
            prompts.append(Prompt(index, [render(spec, "text", record, where)], [], [], None))
        else:  # generate, strict_choice: the model writes the answer after the delimiter
            prompts.append(Prompt(index, [prefix + render(spec, "text", record, where)], [], choices, gold))
    return prompts
