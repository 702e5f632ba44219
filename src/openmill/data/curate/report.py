"""The curate report: counts and bytes in/out per filter, domain and split; histograms of signals.

Written as report.json (the same dict is returned as the stage's manifest metrics), report.md
(tables for people) and plots/<domain>_<signal>.png (kept vs dropped documents).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from openmill.data.curate.dedup import REASONS
from openmill.data.curate.doc import SIGNALS
from openmill.rundir import atomic_write_json, atomic_write_text

_FIELDS = ("docs_in", "docs_out", "bytes_in", "bytes_out")


def _blank() -> dict:
    return {**dict.fromkeys(_FIELDS, 0), "dropped": Counter()}


def _add(into: dict, step: dict) -> None:
    for k in _FIELDS:
        into[k] += step[k]
    into["dropped"].update(step["dropped"])


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def build_report(out_dir: Path, recipe, chunks, dd, plots: bool = True) -> dict:
    import json

    reason, owner = dd["reason"], dd["owner"]
    domains: dict[str, dict] = {}
    signals: dict[str, dict[str, list]] = {}
    for k, (t, stem) in enumerate(chunks):
        st = json.loads(stem.with_name(stem.name + ".stats.json").read_text())
        z = np.load(stem.with_name(stem.name + ".dedup.npz"))
        d = domains.setdefault(
            t.domain,
            {"splits": {}, "reader": _blank(), "filters": {}, "dedup": _blank(), "pii_masked": Counter()},
        )
        sp = d["splits"].setdefault(t.split, dict.fromkeys(_FIELDS, 0))
        bad = sum(st["reader"].values())
        d["reader"]["docs_in"] += st["records"]
        d["reader"]["docs_out"] += st["records"] - bad
        d["reader"]["dropped"].update(st["reader"])
        d["reader"]["bytes_in"] += st["bytes_in"] + st["bad_bytes"]  # texts + raw size of bad lines
        d["reader"]["bytes_out"] += st["bytes_in"]
        for name, step in st["steps"].items():
            _add(d["filters"].setdefault(name, _blank()), step)
        d["pii_masked"].update(st["pii_masked"])
        mine = owner[:, 0] == k
        r = reason[mine]
        kept_bytes = z["kept_bytes"]
        dropped = Counter(REASONS[int(x)] for x in r[r > 0])
        _add(
            d["dedup"],
            {
                "docs_in": len(r),
                "docs_out": int((r == 0).sum()),
                "bytes_in": int(kept_bytes.sum()),
                "bytes_out": int(kept_bytes[r == 0].sum()),
                "dropped": dropped,
            },
        )
        sp["docs_in"] += st["records"]
        sp["bytes_in"] += st["bytes_in"] + st["bad_bytes"]
        sp["docs_out"] += int((r == 0).sum())
        sp["bytes_out"] += int(kept_bytes[r == 0].sum())
        sig = signals.setdefault(t.domain, {s: [] for s in (*SIGNALS, "kept")})
        for s in SIGNALS:
            sig[s].append(z[f"signal_{s}"])
        sig["kept"].append(z["signal_kept"])

    by_filter: dict[str, dict] = {}
    total = dict.fromkeys(_FIELDS, 0)
    for name, d in domains.items():
        for k in _FIELDS:
            d[k] = sum(sp[k] for sp in d["splits"].values())
            total[k] += d[k]
        for fname, step in [("reader", d["reader"]), *d["filters"].items(), ("dedup", d["dedup"])]:
            _add(by_filter.setdefault(fname, _blank()), step)
    metrics = _plain(
        {
            **total,
            "by_filter": by_filter,
            "by_domain": domains,
            "dedup": dd["summary"],
        }
    )
    atomic_write_json(out_dir / "report.json", metrics)
    atomic_write_text(out_dir / "report.md", _markdown(metrics))
    if plots:
        _plots(out_dir / "plots", signals)
    return metrics


def _markdown(m: dict) -> str:
    def pct(a, b):
        return f"{100 * a / b:.1f}%" if b else "-"

    lines = [
        "# curate report",
        "",
        f"Documents: {m['docs_in']:,} in, {m['docs_out']:,} out ({pct(m['docs_out'], m['docs_in'])} kept); "
        f"bytes: {m['bytes_in']:,} in, {m['bytes_out']:,} out.",
        "",
        "## By domain and split",
        "",
        "| domain | split | docs in | docs out | kept | bytes in | bytes out |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in m["by_domain"].items():
        for split, s in d["splits"].items():
            lines.append(
                f"| {name} | {split} | {s['docs_in']:,} | {s['docs_out']:,} | {pct(s['docs_out'], s['docs_in'])} "
                f"| {s['bytes_in']:,} | {s['bytes_out']:,} |"
            )
    lines += ["", "## By filter (in pipeline order) and domain", ""]
    lines += [
        "| domain | filter | docs in | dropped | bytes in | bytes out | reasons |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, d in m["by_domain"].items():
        steps = [("reader", d["reader"]), *d["filters"].items(), ("dedup", d["dedup"])]
        for fname, s in steps:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
            lines.append(
                f"| {name} | {fname} | {s['docs_in']:,} | {s['docs_in'] - s['docs_out']:,} | {s['bytes_in']:,} "
                f"| {s['bytes_out']:,} | {reasons} |"
            )
    dd = m["dedup"]
    lines += [
        "",
        f"Dedup: {dd['candidate_pairs']:,} LSH candidate pairs, {dd['confirmed_pairs']:,} confirmed; "
        f"valid documents duplicating train kept (valid_duplicates_of_train: count): {dd['valid_duplicates_train_kept']}.",
    ]
    masked = {k: v for d in m["by_domain"].values() for k, v in d["pii_masked"].items() if v}
    if masked:
        lines.append(f"PII masked: {masked}.")
    lines += ["", "Rejected documents, with file, line, filter and reason: `rejects/<domain>/<split>/part-*.jsonl.gz`."]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, signals: dict) -> None:
    """One PNG per domain: a grid with a histogram per signal, kept and dropped documents overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for domain, sig in signals.items():
        kept = np.concatenate(sig["kept"]) if sig["kept"] else np.zeros(0, dtype=bool)
        series = {}
        for s in SIGNALS:
            v = np.concatenate(sig[s]) if sig[s] else np.zeros(0)
            if (~np.isnan(v)).sum() >= 2:
                series[s] = v
        if not series:
            continue
        cols = 3
        rows = (len(series) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), dpi=80, squeeze=False)
        for ax in axes.flat[len(series) :]:
            ax.axis("off")
        for ax, (s, v) in zip(axes.flat, series.items()):
            ok = ~np.isnan(v)
            log = s in ("chars", "words")
            vals = np.log10(np.maximum(v, 1)) if log else v
            bins = np.histogram_bin_edges(vals[ok], bins=30)
            ax.hist(vals[ok & kept], bins=bins, alpha=0.7, label=f"passed filters {int((ok & kept).sum())}")
            ax.hist(vals[ok & ~kept], bins=bins, alpha=0.7, label=f"dropped by a filter {int((ok & ~kept).sum())}")
            ax.set_title(f"log10 {s}" if log else s, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        fig.suptitle(f"curate signals: {domain} (documents per bin)", fontsize=10)
        fig.subplots_adjust(hspace=0.5, wspace=0.25, top=0.9)
        fig.savefig(folder / f"{domain}.png")
        plt.close(fig)
