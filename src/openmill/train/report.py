"""The monitor's end-of-run report: pretrain/report.md with PNG plots, built from metrics.jsonl only.

    loss_per_source.png   training loss per source (lines) and validation loss (dots), events marked
    mixture.png           mixture weights over steps, events marked
"""

from __future__ import annotations

from pathlib import Path

from openmill.train.metrics import read_metrics

MARKED = {"phase": "green", "spike": "red", "rewind": "orange", "control": "blue", "plateau": "purple", "sigterm": "black"}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    last: dict[int, float] = {}  # after a rewind a step is logged again: the later value wins
    for r in records:
        if isinstance(r.get(key), (int, float)):
            last[r["step"]] = r[key]
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def _mark_events(ax, events: list[dict]) -> None:
    seen = set()
    for e in events:
        color = MARKED.get(e["event"])
        if color is None:
            continue
        label = e["event"] if e["event"] not in seen else None
        seen.add(e["event"])
        ax.axvline(e["step"], color=color, linestyle="--", linewidth=0.8, label=label)


def write_report(folder: Path, sources: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    records = read_metrics(folder / "metrics.jsonl")
    events = [r for r in records if "event" in r]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in sources:
        steps, values = _series(records, f"train/{s}/loss")
        line = ax.plot(steps, values, label=f"{s} train")[0] if steps else None
        vsteps, vvalues = _series(records, f"val/{s}/loss")
        ax.plot(vsteps, vvalues, "o", color=line.get_color() if line else None, label=f"{s} valid")
    _mark_events(ax, events)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss per source")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "loss_per_source.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for s in sources:
        steps, values = _series(records, f"mix/{s}")
        ax.plot(steps, values, label=s)
    _mark_events(ax, events)
    ax.set(xlabel="step", ylabel="weight", title="mixture weights", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "mixture.png", dpi=100)
    plt.close(fig)

    lines = ["# Pretraining report (HeuriMentor)", "", "![loss per source](loss_per_source.png)", "", "![mixture](mixture.png)", ""]
    lines += ["## Validation", "", "| source | first loss | final loss | final bpb |", "|---|---|---|---|"]
    for s in sources:
        _, loss = _series(records, f"val/{s}/loss")
        _, bpb = _series(records, f"val/{s}/bpb")
        if loss:
            lines.append(f"| {s} | {loss[0]:.4f} | {loss[-1]:.4f} | {bpb[-1]:.4f} |")
    _, fraction = _series(records, "monitor_fraction")
    _, tps = _series(records, "tokens_per_s")
    lines += ["", "## Run", ""]
    if tps:
        lines.append(f"- tokens/s (mean of log windows): {sum(tps) / len(tps):,.0f}")
    if fraction:
        lines.append(f"- monitor host time: {100 * fraction[-1]:.2f}% of wall time")
    frechet = [r for r in records if r.get("frechet_per_btok")]
    if frechet:
        last = frechet[-1]
        worst = max(last["frechet_per_btok"], key=last["frechet_per_btok"].get)
        lines.append(
            f"- weight trajectory at step {last['step']}: largest Frechet distance per billion tokens "
            f"{last['frechet_per_btok'][worst]:.4g} ({worst})"
        )
    lines += ["", "## Events", ""]
    if not events:
        lines.append("none")
    else:
        lines += ["| step | event | details |", "|---|---|---|"]
        for e in events:
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in ("step", "event"))
            lines.append(f"| {e['step']} | {e['event']} | {details} |")
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value).replace("|", "/")
