"""Live control of a running pretraining job: RUN/pretrain/control.yaml (HeuriMentor's engine).

The file is a flat mapping of settings, written by `openmill control RUN --set key=value` (or by
hand). The running job looks at it at step boundaries (every step with one process; at log steps
under torchrun, where rank 0's reading is broadcast so every rank changes at the same step) and
applies it when its content changed. A file with any bad entry is refused as a whole, with a
message, and the run continues unchanged.

    data.weights.<source>: w   the source's share of the mixture (0..1); unnamed sources share
                               the rest in their current proportions. Holds until the next phase.
    lr_scale: s                multiplies the learning rate from the next step on (0 < s <= 100)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from openmill.config import parse_override
from openmill.rundir import atomic_write_text

CONTROL_FILE = "control.yaml"


class ControlError(ValueError):
    """A control setting that cannot be applied; the message names the key."""


def control_path(run: Path) -> Path:
    return Path(run) / "pretrain" / CONTROL_FILE


def validate(settings: dict, current: dict[str, float]) -> tuple[dict[str, float] | None, float | None]:
    """(new mixture weights or None, new lr scale or None) for `settings`, or ControlError."""
    if not isinstance(settings, dict):
        raise ControlError("control file: expected a mapping of key: value")
    shares, lr_scale = {}, None
    for key, value in settings.items():
        if key == "lr_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
                raise ControlError(f"lr_scale: expected a number in (0, 100], got {value!r}")
            lr_scale = float(value)
        elif isinstance(key, str) and key.startswith("data.weights."):
            source = key.removeprefix("data.weights.")
            if source not in current:
                raise ControlError(f"{key}: unknown source; choices: {', '.join(current)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ControlError(f"{key}: expected a share in [0, 1], got {value!r}")
            shares[source] = float(value)
        else:
            raise ControlError(f"{key}: unknown control key; valid: data.weights.<source>, lr_scale")
    if not shares:
        return None, lr_scale
    named = sum(shares.values())
    if named > 1 + 1e-9:
        raise ControlError(f"data.weights: the shares set sum to {named:g}; they must sum to at most 1")
    rest = {s: w for s, w in current.items() if s not in shares}
    rest_total = sum(rest.values())
    weights = dict(shares)
    weights.update({s: (1 - named) * w / rest_total if rest_total > 0 else 0.0 for s, w in rest.items()})
    if sum(weights.values()) <= 0:
        raise ControlError("data.weights: every source would have weight 0")
    return weights, lr_scale


class ControlFile:
    """Watches one control file; `poll` returns its settings when the content changed."""

    def __init__(self, path: Path, applied_hash: str | None = None):
        self.path = Path(path)
        self.applied_hash = applied_hash

    def poll(self) -> tuple[str, dict] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self.applied_hash:
            return None
        self.applied_hash = digest
        try:
            settings = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            return digest, {"__error__": f"not valid YAML: {e}".replace("\n", " ")}
        return digest, settings


def write_settings(run: Path, overrides: list[str]) -> Path:
    """`openmill control RUN --set k=v ...`: merge into RUN/pretrain/control.yaml (atomically)."""
    path = control_path(run)
    if not path.parent.is_dir():
        raise ControlError(f"{path.parent}: no pretrain folder (is {run} a run directory?)")
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings = settings or {}
    for text in overrides:
        key, value = parse_override(text)
        settings[key] = value
    # Checked as the job will check it: the job refuses a file with any bad entry as a whole, so a
    # typo written here would block every later setting too.
    validate(settings, {domain: 1.0 for domain in _run_domains(run)})
    atomic_write_text(path, yaml.safe_dump(settings, sort_keys=True))
    return path


def _run_domains(run: Path) -> list[str]:
    """The data domains of the recipe the run was started with (RUN/recipe.yaml)."""
    path = Path(run) / "recipe.yaml"
    if not path.is_file():
        raise ControlError(f"{path}: missing (every run directory has the recipe it was started with)")
    return list(yaml.safe_load(path.read_text(encoding="utf-8"))["data"]["domains"])
