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
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(folder) / "tb"), purge_step=resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

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
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
