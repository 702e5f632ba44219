"""Metrics to metrics.jsonl (one JSON object a line) and TensorBoard, from the main process only."""

from __future__ import annotations

import json
from pathlib import Path

from openmill.rundir import atomic_write_text


class MetricsLog:
    def __init__(self, folder: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps run again.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events from the first re-run step on are dropped; the resume step's own stay (it is not re-logged).
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(Path(folder) / "tb"), purge_step=purge)
        self._file = open(self.path, "a", encoding="utf-8")

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (the process died while writing it) is left
    out; a bad line anywhere else is an error naming the file and line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON metrics record ({e.msg})") from None
    return records
