from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

METRIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class EvalIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=METRIC_NAME, description="metric name, e.g. accuracy")
    value: float = Field(description="a finite number")
    dataset: str | None = Field(default=None, max_length=256)


class EvalOut(EvalIn):
    created_at: datetime
