from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltareg.client.errors import InvalidInput
from deltareg.client.fingerprint import is_fingerprint
from deltareg.registry.body import describe_errors
from deltareg.registry.models import ExpectedResult

# The safetensors dtypes a base model is applied in (and so the merged model is written in).
RESULT_DTYPES = ("BF16", "F16", "F32", "F64")
FINGERPRINT_HELP = "'tmv1:' followed by 64 lower-case hex digits"


class RecordResultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(
        max_length=80, description="tmv1: fingerprint of the model the version yields on its base"
    )


class ResultOut(BaseModel):
    base_dtype: str = Field(description="the base's safetensors dtype: BF16, F16, F32 or F64")
    fingerprint: str = Field(description="tmv1: fingerprint of the merged model")
    actor: str | None = Field(description="who recorded it")
    created_at: datetime


class ResultRecorded(ResultOut):
    repo: str
    number: int
    digest: str
    created: bool = Field(description="false: the same fingerprint was recorded before; nothing changed")


class ResultList(BaseModel):
    repo: str
    number: int
    digest: str
    results: list[ResultOut] = Field(description="one per base dtype, by dtype")


def result_out(row: ExpectedResult) -> ResultOut:
    return ResultOut(
        base_dtype=row.base_dtype, fingerprint=row.fingerprint, actor=row.actor, created_at=row.created_at
    )


def check_dtype(base_dtype: str) -> str:
    """``base_dtype`` if it is one a result is recorded for; InvalidInput naming the choices if not."""
    if base_dtype not in RESULT_DTYPES:
        raise InvalidInput(
            f"unknown base dtype {base_dtype[:32]!r}: expected one of {', '.join(RESULT_DTYPES)}"
        )
    return base_dtype


def parse_record_request(raw: bytes) -> str:
    """The fingerprint of a ``PUT .../results/{dtype}`` body; InvalidInput saying what is wrong.

    Parsed here rather than by FastAPI so that the refusal is audited (the route watches first).
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput('invalid request body: expected JSON {"fingerprint": "tmv1:..."}') from None
    try:
        fingerprint = RecordResultRequest.model_validate(data).fingerprint
    except ValidationError as exc:
        raise InvalidInput(f"invalid request body: {describe_errors(exc.errors())}") from None
    if not is_fingerprint(fingerprint):
        raise InvalidInput(f"invalid fingerprint {fingerprint!r}: expected {FINGERPRINT_HELP}")
    return fingerprint
