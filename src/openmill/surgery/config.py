"""Recipe sections of the `upscale` and `continue_pretrain` stages (docs/upscale.md).

    upscale:            {drop: 1, copies: 2}         pretrain/final -> upscale/model (DUS)
    continue_pretrain:  {steps: 40, warmup_steps: 5}  upscale/model  -> continue_pretrain/final

Continued pretraining is the pretrain stage run again (train/pretrain.run_pretrain with
`init_from`: the given weights, a fresh optimizer and its own warm-up and schedule). Each field
left unset here is taken from the recipe's `pretrain` section, so data mixture, batch and
sequence length follow the first run unless changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UpscaleConfig(Strict):
    source: Path | None = None  # an openmill or Hugging Face folder; None = the model of the stages before (stages.model_before)
    drop: int | None = Field(None, ge=0)  # m; None = n_layers // 4 (SOLAR: 8 of 32)
    copies: int = Field(2, ge=2)

    def drop_for(self, n_layers: int) -> int:
        return self.drop if self.drop is not None else n_layers // 4


class ContinuePretrainConfig(Strict):
    init_from: Path | None = None  # None = this run's upscale/model
    steps: int = Field(100, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr: float | None = Field(None, gt=0)
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    schedule: Literal["cosine", "wsd", "constant"] | None = None
    batch_size: int | None = Field(None, gt=0)
    log_every: int | None = Field(None, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_tokens: int | None = Field(None, gt=0)
    checkpoint_every: int | None = Field(None, gt=0)

    def pretrain_config(self, pretrain, init_from: Path):
        """The PretrainConfig this stage trains with: pretrain's, with the fields set here."""
        fields = pretrain.model_dump()
        fields.pop("phases", None)  # a phase schedule belongs to the run that declared it
        own = self.model_dump(exclude={"init_from"}, exclude_none=True)
        return type(pretrain)(**{**fields, **own, "init_from": init_from})
