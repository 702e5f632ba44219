"""Configuration of the `curate` stage (filters, dedup, outputs)."""

from pydantic import BaseModel, ConfigDict


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
