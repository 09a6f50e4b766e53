"""Search requests and answers: filters over versions, their evals, bases and aliases."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from deltareg.client.errors import InvalidInput
from deltareg.client.refs import RepoName
from deltareg.registry.evals.schemas import METRIC_NAME, EvalOut
from deltareg.registry.versions.schemas import VersionSummary

OPERATORS = (">=", "<=", "=", ">", "<")
MAX_CONDITIONS = 16
MAX_PAGE = 1000
DEFAULT_PAGE = 100
_CONDITION = re.compile(r"^\s*([^<>=\s]+)\s*(>=|<=|==|=|>|<)\s*(\S+)\s*$")
_METRIC = re.compile(METRIC_NAME)


@dataclass(frozen=True)
class Condition:
    """``metric op value``: the metric's newest score (on the search's dataset, if any) compared to value."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> Condition:
        """``accuracy>=0.8``; anything else is InvalidInput naming the expression and what is wrong."""
        usage = "expected METRIC OP NUMBER with OP one of >=, <=, >, <, = (e.g. accuracy>=0.8)"
        match = _CONDITION.match(text)
        if match is None:
            raise InvalidInput(f"invalid where {text!r}: {usage}")
        metric, op, number = match.groups()
        if not _METRIC.match(metric):
            raise InvalidInput(
                f"invalid where {text!r}: {metric!r} is not a metric name (letters, digits, '.', '_', "
                "'/', '-', starting with a letter or digit, at most 128 characters)"
            )
        try:
            value = float(number)
        except ValueError:
            raise InvalidInput(f"invalid where {text!r}: {number!r} is not a number; {usage}") from None
        if not math.isfinite(value):
            raise InvalidInput(f"invalid where {text!r}: {number!r} is not a finite number")
        return cls(metric, "=" if op == "==" else op, value)


@dataclass(frozen=True)
class SearchFilters:
    """What to look for; every filter given must hold (AND)."""

    repo: RepoName | None = None
    namespace: str | None = None
    base: str | None = None
    where: tuple[Condition, ...] = ()
    dataset: str | None = None
    alias: str | None = None
    include_yanked: bool = False
    limit: int = DEFAULT_PAGE
    before_id: int | None = field(default=None)


class VersionHit(VersionSummary):
    evals: list[EvalOut] = Field(description="every score of the version, oldest first")
    matched: list[EvalOut] = Field(
        default_factory=list, description="for each where condition, the score that satisfied it"
    )


class VersionSearch(BaseModel):
    versions: list[VersionHit] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next (older) page; null at the end")
