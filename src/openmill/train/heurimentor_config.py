"""HeuriMentor's recipe sections (docs/heurimentor.md): phases, sources, mixture policy, monitor.

They live in `pretrain:` of a recipe. A recipe without `phases` trains one implicit phase built
from the plain pretrain fields, exactly as before.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhaseConfig(_Strict):
    """One training phase (Aquila2's language modelling -> knowledge -> target-oriented stages).

    `steps` is the phase's budget (its tokens are steps x batch_size x seq_len); the phases split
    pretrain.steps, and are scaled in proportion when pretrain.steps is overridden. Unset fields take
    the pretrain value. Without `lr`/`schedule` the run's global schedule continues through the
    phase; with either, the phase runs its own schedule over its own steps (warm-up included).
    """

    name: str
    steps: int = Field(gt=0)
    mixture: dict[str, float] = Field(default_factory=dict)  # empty: the pretrain mixture
    seq_len: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] | None = None
    warmup_steps: int | None = Field(None, ge=0)
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    # End the phase early (its left-over steps go to the next phase) when the monitor reports a plateau.
    end_on_plateau: bool = False


class SourceConfig(_Strict):
    """Per-source data rules; the source's tokens are the domain of the same name."""

    # Repetition cap: at most this many passes over the source's training tokens (e.g. 1.5-3 for
    # high-quality sources); a source at its cap gets weight 0 and the others are renormalised.
    max_epochs: float | None = Field(None, gt=0)
    tags: list[str] = Field(default_factory=list)


class PolicyConfig(_Strict):
    """How mixture weights move within a phase. `static`: the phase's mixture as given ("staged" is
    static with several phases). `underlearned`: see docs/heurimentor.md for the exact rule."""

    kind: Literal["static", "underlearned"] = "static"
    eta: float = Field(4.0, ge=0)  # exponent scale on the log-loss gap
    min_ratio: float = Field(0.5, gt=0)  # clip: new weight >= min_ratio x phase weight
    max_ratio: float = Field(2.0, gt=0)  # clip: new weight <= max_ratio x phase weight
    # Per-source reference validation loss (e.g. a reference model's); empty: each source's own loss
    # at the phase's first evaluation, so the rule measures how slowly each source improves.
    reference: dict[str, float] = Field(default_factory=dict)


class SpikeConfig(_Strict):
    """Loss spike: loss > mean + sigmas x std over the last `window` steps (OLMo-core: 6 over 128)."""

    window: int = Field(128, ge=4)
    sigmas: float = Field(6.0, gt=0)
    min_steps: int = Field(20, ge=2)  # no verdict before the window holds this many losses
    # none: event only. skip_update: drop that step's update (costs one host sync per step to read
    # the verdict before the optimizer). rewind: back to the last checkpoint before the spike and skip
    # the data window (PaLM). downweight: rewind, skip, and multiply the spiking source's weight by
    # downweight_factor (Aquila2: clean the noisy source rather than only roll back).
    response: Literal["none", "skip_update", "rewind", "downweight"] = "rewind"
    skip_batches: int = Field(0, ge=0)  # data steps skipped beyond the spike itself
    downweight_factor: float = Field(0.5, ge=0, lt=1)
    max_rewinds: int = Field(5, ge=0)  # then the run stops: the data or the settings are at fault


class PlateauConfig(_Strict):
    """Plateau: the mean validation loss improved by less than `min_rel_improvement` (relative) over
    the last `patience` evaluations."""

    patience: int = Field(3, ge=1)
    min_rel_improvement: float = Field(0.01, ge=0)


class MonitorConfig(_Strict):
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    weight_trajectory: bool = True  # per-layer weight std per checkpoint + Frechet distance
    report: bool = True  # pretrain/report.md with PNG plots at the end of the run
    # Periodic evaluation hook: a dotted "module:function" called as fn(model, step) -> {name: float}.
    eval_hook: str | None = None
