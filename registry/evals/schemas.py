from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from deltareg.registry.models import Eval

METRIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class EvalIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=METRIC_NAME, description="metric name, e.g. accuracy")
    value: float = Field(description="a finite number")
    dataset: str | None = Field(default=None, max_length=256, description="the dataset it was measured on")
    dataset_revision: str | None = Field(default=None, max_length=256, description="that dataset's revision")
    suite_version: str | None = Field(default=None, max_length=128, description="the eval suite's version")


class EvalOut(EvalIn):
    actor: str | None = Field(description="who recorded it")
    created_at: datetime


def eval_out(row: Eval) -> EvalOut:
    return EvalOut(
        name=row.name,
        value=row.value,
        dataset=row.dataset,
        dataset_revision=row.dataset_revision,
        suite_version=row.suite_version,
        actor=row.actor,
        created_at=row.created_at,
    )
