"""The eval stage's recipe section (Recipe.eval)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The model folder to evaluate: relative to the run directory or absolute; None = the model the
    # stages listed before eval produced last (e.g. dpo/final after sft and dpo).
    model: Path | None = None
    preset: str | None = "quick"  # a name from src/openmill/eval/tasks/presets.yaml: quick, h6, zh, en
    tasks: list[str] = Field(default_factory=list)  # more task names, evaluated after the preset's
    task_files: list[Path] = Field(default_factory=list)  # extra task YAML files (a new task needs no code)
    data_dir: Path = Path("../shared/data")  # what {data_dir} means in task YAMLs
    limit: int | None = Field(None, gt=0)  # first N records of every task
    batch_size: int = Field(16, gt=0)
    chat: bool = False  # prompts through the model's chat template
    seed: int = 1234  # few-shot sampling
    device: str = "auto"
    # CPU intra-op threads; None = torch's default. A 2M-parameter model's matmuls are too small to
    # split: on the 2-core demo machine, shared, 1 thread ran the quick preset 8x faster than 2.
    threads: int | None = Field(None, gt=0)
