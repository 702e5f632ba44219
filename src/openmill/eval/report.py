"""Results of one or more models side by side: results.json, results.md (a table) and
results.png (a bar chart), plus per-record scores in samples/<model>/<task>.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

from openmill.eval.runner import TaskResult
from openmill.rundir import atomic_write_text

# Perplexities and bits-per-byte are shown as they are; every other metric is a fraction shown in %.
RAW_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def results_dict(by_model: dict[str, list[TaskResult]]) -> dict:
    return {
        model: {r.name: {"metrics": r.metrics, "n": r.n, "shots": r.shots, "seconds": round(r.seconds, 2)} for r in results}
        for model, results in by_model.items()
    }


def markdown_table(results: dict) -> str:
    models = list(results)
    rows = []
    for model in models:
        for task, r in results[model].items():
            for metric in r["metrics"]:
                if (task, metric) not in rows:
                    rows.append((task, metric))
    head = "| task | metric | n | shots | " + " | ".join(models) + " |"
    lines = [head, "|" + "---|" * (4 + len(models))]
    for task, metric in rows:
        first = next(results[m][task] for m in models if task in results[m])
        cells = []
        for m in models:
            value = results[m].get(task, {}).get("metrics", {}).get(metric)
            cells.append("" if value is None else f"{value:.3f}" if metric in RAW_METRICS else f"{100 * value:.1f}")
        lines.append(f"| {task} | {metric} | {first['n']} | {first['shots']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    """Accuracy-type metrics (in %) per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    labels = sorted({f"{t}\n{m}" for r in results.values() for t, v in r.items() for m in v["metrics"] if m not in RAW_METRICS})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        values = []
        for label in labels:
            task, metric = label.split("\n")
            values.append(100 * results[model].get(task, {}).get("metrics", {}).get(metric, 0.0))
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(by_model: dict[str, list[TaskResult]], out: Path) -> dict:
    """Write results.json / results.md / results.png / samples/ into `out`; returns the results dict."""
    out.mkdir(parents=True, exist_ok=True)
    results = results_dict(by_model)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "results.md", markdown_table(results))
    if any(r["metrics"] for m in results.values() for r in m.values()):
        bar_chart(results, out / "results.png")
    for model, task_results in by_model.items():
        folder = out / "samples" / (re.sub(r"[^\w.-]+", "_", model).strip("_") or "model")  # labels may be paths
        folder.mkdir(parents=True, exist_ok=True)
        for r in task_results:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in r.records)
            atomic_write_text(folder / f"{r.name}.jsonl", lines)
    return results
