from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltareg.client.errors import InvalidInput
from deltareg.registry.models import Eval

METRIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
MAX_EVALS = 64


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


class RecordEvalsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evals: list[EvalIn] = Field(min_length=1, max_length=MAX_EVALS, description="the scores to record")


class EvalsRecorded(BaseModel):
    repo: str
    number: int
    digest: str
    evals: list[EvalOut] = Field(description="the scores recorded by this request")


def parse_record_request(raw: bytes) -> RecordEvalsRequest:
    """The body of ``POST .../evals``; a bad one is InvalidInput naming the metric and what is wrong.

    Parsed here rather than by FastAPI so that the refusal is audited (the route watches first) and the
    message names the metric (``eval 'accuracy': NaN is not a finite number``), not a pydantic location.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput(
            'invalid request body: expected JSON {"evals": [{"name": ..., "value": ...}]}'
        ) from None
    try:
        return RecordEvalsRequest.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, data) for error in exc.errors()[:5]]
        raise InvalidInput("invalid evals: " + "; ".join(problems)) from None


def _describe(error: Any, data: Any) -> str:
    loc = tuple(error.get("loc", ()))
    message = str(error.get("msg", "invalid"))
    if len(loc) < 2 or loc[0] != "evals" or not isinstance(loc[1], int):
        return f"{'.'.join(map(str, loc)) or 'body'}: {message}"
    item = data["evals"][loc[1]]
    name = item.get("name") if isinstance(item, dict) else None
    label = f"eval {name!r}" if isinstance(name, str) else f"eval #{loc[1] + 1}"
    field = ".".join(map(str, loc[2:]))
    if error.get("type") == "finite_number":
        value = error.get("input")
        shown = _number_text(value) if isinstance(value, float) else repr(value)
        return f"{label}: {shown} is not a finite number (NaN and infinities are refused)"
    return f"{label}: {field}: {message}" if field else f"{label}: {message}"


def _number_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(value) if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")
