"""Promotion policies (one per repo and alias) and approvals, as the API reads and writes them.

A policy is stored as the JSON of ``Policy`` (normalized: every field present). All its rules are
optional, but a policy must have at least one; a version is judged on the newest value recorded for each
metric (the last eval written, whatever its dataset).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from deltareg.client.refs import ALIAS
from deltareg.registry.evals.schemas import METRIC_NAME

MAX_METRIC_RULES = 32  # per kind of rule (min, max, no_regression)
MAX_APPROVALS = 100
MAX_COMMENT_LENGTH = 1000

MetricName = Annotated[str, StringConstraints(pattern=METRIC_NAME)]
AliasName = Annotated[str, StringConstraints(pattern=f"^{ALIAS.pattern}$")]


class RegressionRule(BaseModel):
    """The version must not be worse than the alias's holder on ``metric`` by more than ``tolerance``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    metric: MetricName
    tolerance: float = Field(default=0.0, ge=0, description="the largest drop that still passes")
    higher_is_better: bool = Field(default=True, description="false for metrics like loss or latency")


class Policy(BaseModel):
    """What a version must satisfy before an alias may be moved to it (every rule is checked)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min: dict[MetricName, float] = Field(
        default_factory=dict, max_length=MAX_METRIC_RULES, description="metric -> lowest value allowed"
    )
    max: dict[MetricName, float] = Field(
        default_factory=dict, max_length=MAX_METRIC_RULES, description="metric -> highest value allowed"
    )
    no_regression: list[RegressionRule] = Field(default_factory=list, max_length=MAX_METRIC_RULES)
    approvals: int = Field(
        default=0, ge=0, le=MAX_APPROVALS, description="approvals needed from people other than the pusher"
    )
    require_signature: bool = Field(
        default=False,
        description="the version must be signed by a key of its namespace that is not revoked",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        metrics = [rule.metric for rule in self.no_regression]
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise ValueError(f"no_regression names {', '.join(repeated)} more than once")
        impossible = sorted(m for m in self.min.keys() & self.max.keys() if self.min[m] > self.max[m])
        if impossible:
            raise ValueError(f"minimum above maximum for {', '.join(impossible)}: no version could pass")
        if not (self.min or self.max or self.no_regression or self.approvals or self.require_signature):
            raise ValueError("a policy needs at least one rule; to remove a policy, delete it")
        return self

    def metrics(self) -> list[str]:
        """Every metric a rule names, in the order the rules name them (once each)."""
        names = [*self.min, *self.max, *(rule.metric for rule in self.no_regression)]
        return list(dict.fromkeys(names))


class PolicyOut(BaseModel):
    repo: str
    alias: str
    policy: Policy
    updated_by: str | None
    updated_at: datetime


class PolicyList(BaseModel):
    repo: str
    policies: list[PolicyOut] = Field(description="sorted by alias")


class ApproveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: AliasName = Field(description="the alias the approver agrees to move to this version")
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_LENGTH)


class ApprovalOut(BaseModel):
    repo: str
    version: int
    alias: str
    actor: str
    comment: str | None
    created_at: datetime


class ApprovalCreated(ApprovalOut):
    created: bool = Field(description="false when this actor had already approved (nothing changed)")


class ApprovalList(BaseModel):
    repo: str
    version: int
    approvals: list[ApprovalOut] = Field(description="oldest first")
