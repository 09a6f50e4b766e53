"""Judging a promotion against a policy: every rule is checked and every failure is described.

Pure functions over what the service read in the move's transaction (the target, the holder the move
compare-and-swaps from, their newest eval per metric, the approvals), so the rules cannot be judged against
one holder and applied to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltareg.registry.auth.principal import ANONYMOUS
from deltareg.registry.policies.schemas import Policy, RegressionRule

# A drop of exactly the tolerance passes, whatever the rounding of the subtraction.
_SLACK = 1e-12


@dataclass(frozen=True)
class Candidate:
    """A version as the rules see it: its number, pusher, newest value of each metric, and whether a key of
    its namespace that is not revoked signed it."""

    number: int
    pushed_by: str | None
    metrics: dict[str, float]
    signed: bool = False


@dataclass(frozen=True)
class Promotion:
    alias: str
    target: Candidate
    holder: Candidate | None  # None: the move creates the alias
    approvers: list[str] = field(default_factory=list)  # every actor who approved (target, alias)


def failures(policy: Policy, promotion: Promotion) -> list[str]:
    """Every rule of ``policy`` the promotion fails, described; empty when it passes."""
    target = promotion.target
    found: list[str] = [
        f"version {target.number} lacks metric {name} required by the policy"
        for name in policy.metrics()
        if name not in target.metrics
    ]
    for name, minimum in policy.min.items():
        value = target.metrics.get(name)
        if value is not None and value < minimum:
            found.append(f"{name} {_num(value)} < minimum {_num(minimum)}")
    for name, maximum in policy.max.items():
        value = target.metrics.get(name)
        if value is not None and value > maximum:
            found.append(f"{name} {_num(value)} > maximum {_num(maximum)}")
    for rule in policy.no_regression:
        problem = _regression(rule, target, promotion.holder)
        if problem is not None:
            found.append(problem)
    if policy.approvals:
        problem = _approvals(policy.approvals, promotion)
        if problem is not None:
            found.append(problem)
    if policy.require_signature and not target.signed:
        found.append(
            f"signature required: version {target.number} has no signature by a key of the namespace "
            "that is not revoked"
        )
    return found


def _regression(rule: RegressionRule, target: Candidate, holder: Candidate | None) -> str | None:
    """A holder without the metric (or no holder: the move creates the alias) leaves nothing to regress
    from, so the rule passes; a target without it fails the "lacks metric" rule instead."""
    value = target.metrics.get(rule.metric)
    held = None if holder is None else holder.metrics.get(rule.metric)
    if value is None or held is None or holder is None:
        return None
    drop = held - value if rule.higher_is_better else value - held
    if drop <= rule.tolerance + _SLACK * max(1.0, abs(held)):
        return None
    direction = "" if rule.higher_is_better else "lower is better, "
    return (
        f"{rule.metric} {_num(value)} regresses from {_num(held)} held by version {holder.number} "
        f"({direction}tolerance {_num(rule.tolerance)})"
    )


def _approvals(required: int, promotion: Promotion) -> str | None:
    pusher = promotion.target.pushed_by
    counted = sorted({a for a in promotion.approvers if a != pusher and a != ANONYMOUS})
    if len(counted) >= required:
        return None
    who = f": {', '.join(counted)}" if counted else ""
    note = f" (approvals from the pusher {pusher} do not count)" if pusher and pusher != ANONYMOUS else ""
    return f"{len(counted)} of {required} approvals for {promotion.alias}{who}{note}"


def _num(value: float) -> str:
    return repr(value)
