"""Per-record scores and their aggregates, defined as lm-evaluation-harness defines them:
acc = argmax of summed log-likelihoods; acc_norm divides each by the choice's length in
characters, acc_bytes by its UTF-8 length; mc2 = normalised probability mass on the true
answers; perplexity = exp(-mean log-likelihood); corpus perplexities sum over all documents."""

from __future__ import annotations

import math
import re

import numpy as np


def choice_scores(lls: list[float], choices: list[str], gold, metrics: list[str]) -> dict[str, float]:
    ll = np.array(lls)
    out = {}
    if "acc" in metrics:
        out["acc"] = float(np.argmax(ll) == gold)
    if "acc_norm" in metrics:
        out["acc_norm"] = float(np.argmax(ll / np.array([float(len(c)) for c in choices])) == gold)
    if "acc_bytes" in metrics:
        out["acc_bytes"] = float(np.argmax(ll / np.array([float(len(c.encode("utf-8"))) for c in choices])) == gold)
    if "mc2" in metrics:
        labels = np.array([int(x) for x in gold])
        p = np.exp(ll - ll.max())
        out["mc2"] = float(p[labels == 1].sum() / p.sum())
    return out


def extract(text: str, regex: str, which: int) -> str | None:
    """Match number `which` (0 first, -1 last) of `regex` in `text` (its first non-empty group if it has groups)."""
    matches = re.findall(regex, text)
    if not matches:
        return None
    last = matches[which]
    if isinstance(last, tuple):
        last = next((m for m in last if m), "")
    return last.strip()


def normalise(text: str, ignore: list[str]) -> str:
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.strip()


def generate_scores(output: str, gold: str, extractors: dict[str, str], ignore: list[str], metrics: list[str]) -> dict[str, float]:
    out = {}
    reference = normalise(str(gold), ignore)
    for metric in metrics:
        # As lm-evaluation-harness's GSM8K filters: strict takes the first match (the "#### n"
        # answer line), flexible the last (the last number written).
        kind = metric.removeprefix("exact_match_")
        answer = extract(output, extractors[kind], 0 if kind == "strict" else -1)
        out[metric] = float(answer is not None and normalise(answer, ignore) == reference)
    return out


def aggregate(per_record: list[dict[str, float]], extra: dict[str, float] | None = None) -> dict[str, float]:
    """Mean of each per-record score; `perplexity` is exp(-mean ll) over records."""
    keys = per_record[0].keys() if per_record else []
    out = {k: float(np.mean([r[k] for r in per_record])) for k in keys if k != "ll"}
    if per_record and "ll" in per_record[0]:
        out["perplexity"] = math.exp(-float(np.mean([r["ll"] for r in per_record])))
    out.update(extra or {})
    return out
