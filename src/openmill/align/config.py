"""Configuration of the `sft` and `dpo` stages (docs/align.md).

Both train through the pretraining engine (train/engine.py); `engine_config()` hands it the
optimizer, schedule, logging and checkpoint fields it reads, as a PretrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TEMPLATES = ("chatml", "solar", "llama2")  # openmill.align.templates.NAMED


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    """Low-rank adapters on the named projections; merged into the weights when the stage ends."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class AlignStage(Strict):
    # The model trained: a model folder. None = the newest model of the stages listed before this
    # one (stages.model_before): sft after pretrain trains pretrain/final, dpo after sft sft/final.
    init_from: Path | None = None
    train: list[Path] = Field(default_factory=list)
    valid: list[Path] = Field(default_factory=list)  # empty: hold out valid_fraction of train
    valid_fraction: float = Field(0.05, ge=0, lt=1)
    # Cap on training examples that fit seq_len, taken in a seeded shuffled order: dropped ones do not count.
    max_examples: int | None = Field(None, gt=0)
    bad_records: Literal["fail", "skip"] = "fail"  # skip: counted by reason in the manifest
    template: Literal[TEMPLATES] | None = None  # None: the model folder's own chat template
    system_prompt: str | None = None  # added to conversations that have none
    seq_len: int = Field(512, gt=1)
    too_long: Literal["drop", "fail"] = "drop"  # longer examples are never cut: dropped and counted, or an error
    lora: LoraConfig | None = None
    chat_prompts: list[str] = Field(default_factory=list)  # answered after training (greedy), printed and recorded
    chat_max_new_tokens: int = Field(48, gt=0)

    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)  # rows (SFT) or pairs (DPO) per optimizer step, summed over processes
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Under torchrun: DDP ("auto", "ddp") or FSDP2 ("fsdp"), as pretrain.parallel; batch_size is then
    # summed over processes and must divide by processes x grad_accum.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    threads: int | None = None
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(1, ge=1)
    tensorboard: bool = False

    @model_validator(mode="after")
    def _batch(self):
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        return self

    @model_validator(mode="after")
    def _heldout(self):
        # The stage's before/after numbers are held-out ones: without a held-out set it could not say
        # whether training helped, so that is refused here rather than reported as a 0 loss.
        if not self.valid and self.valid_fraction == 0:
            raise ValueError("valid_fraction is 0 and no valid files are given: no held-out set to evaluate on "
                             "(give valid files or a valid_fraction > 0)")
        return self

    def engine_config(self):
        from openmill.config import PretrainConfig

        fields = set(PretrainConfig.model_fields) & set(type(self).model_fields) - {"init_from"}
        return PretrainConfig(**{f: getattr(self, f) for f in fields})


class SftConfig(AlignStage):
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = "auto"
    packing: bool = True  # several conversations per row (document-masked), else one per row, padded


class DpoConfig(AlignStage):
    format: Literal["auto", "llamafactory", "hh_rlhf", "messages"] = "auto"
    loss: Literal["sigmoid", "dpo_norm", "ipo"] = "sigmoid"  # dpo_norm: Moxin/Tulu's length-normalised DPO
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-6, gt=0)
