"""``deltareg policy set|show|clear``: the promotion policies of a repo's aliases."""

from __future__ import annotations

import math
from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, parse_pairs, with_session


@cli.group()
def policy() -> None:
    """Promotion policies: what a version must satisfy before an alias may move to it."""


def _thresholds(pairs: tuple[str, ...], option: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric, text in parse_pairs(pairs, option).items():
        values[metric] = _finite(text, f"{metric}: {text!r}", option)
    return values


def _finite(text: str, what: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{what} is not a number", param_hint=option) from None
    if not math.isfinite(value):
        raise click.BadParameter(f"{what} is not a finite number", param_hint=option)
    return value


def _regressions(specs: tuple[str, ...], lower_is_better: tuple[str, ...]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for spec in specs:
        metric, sep, tolerance = spec.partition(":")
        if not metric:
            hint = "--no-regression"
            raise click.BadParameter(f"expected METRIC[:TOLERANCE], got {spec!r}", param_hint=hint)
        rule: dict[str, Any] = {"metric": metric, "higher_is_better": metric not in lower_is_better}
        if sep:
            rule["tolerance"] = _finite(tolerance, f"{metric}: tolerance {tolerance!r}", "--no-regression")
        rules.append(rule)
    unknown = sorted(set(lower_is_better) - {rule["metric"] for rule in rules})
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)} has no --no-regression rule", param_hint="--lower-is-better"
        )
    return rules


@policy.command("set")
@click.argument("repo")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias the policy guards.")
@click.option("--min", "minimums", multiple=True, metavar="METRIC=VALUE", help="Lowest value allowed.")
@click.option("--max", "maximums", multiple=True, metavar="METRIC=VALUE", help="Highest value allowed.")
@click.option(
    "--no-regression",
    "regressions",
    multiple=True,
    metavar="METRIC[:TOLERANCE]",
    help="Must not be worse than the alias's current holder by more than TOLERANCE (default 0).",
)
@click.option(
    "--lower-is-better",
    "lower_is_better",
    multiple=True,
    metavar="METRIC",
    help="For a --no-regression metric where lower is better (loss, latency).",
)
@click.option(
    "--approvals",
    type=click.IntRange(0, 100),
    default=0,
    help="Approvals needed from people other than the pusher (deltareg approve).",
)
@click.option(
    "--require-signature",
    is_flag=True,
    help="The version must be signed by a key of the namespace that is not revoked (deltareg sign).",
)
@with_session
def set_(
    session: Session,
    repo: str,
    alias: str,
    minimums: tuple[str, ...],
    maximums: tuple[str, ...],
    regressions: tuple[str, ...],
    lower_is_better: tuple[str, ...],
    approvals: int,
    require_signature: bool,
) -> None:
    """Set (replace) the promotion policy of ALIAS of REPO; every rule is checked on each promotion."""
    body = {
        "min": _thresholds(minimums, "--min"),
        "max": _thresholds(maximums, "--max"),
        "no_regression": _regressions(regressions, lower_is_better),
        "approvals": approvals,
        "require_signature": require_signature,
    }
    saved = session.registry.set_policy(repo, alias, body)
    session.emit(saved, lambda: _print(saved))


@policy.command()
@click.argument("repo")
@click.option("--alias", "alias", default=None, metavar="NAME", help="Only this alias's policy.")
@with_session
def show(session: Session, repo: str, alias: str | None) -> None:
    """Show the promotion policies of REPO (or of one alias)."""
    if alias is not None:
        one = session.registry.policy(repo, alias)
        session.emit(one, lambda: _print(one))
        return
    policies = session.registry.policies(repo)

    def table() -> None:
        if not policies:
            click.echo(f"{repo} has no promotion policies")
        for found in policies:
            _print(found)

    session.emit({"repo": repo, "policies": policies}, table)


@policy.command()
@click.argument("repo")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias whose policy to remove.")
@with_session
def clear(session: Session, repo: str, alias: str) -> None:
    """Remove the promotion policy of ALIAS of REPO."""
    removed = session.registry.clear_policy(repo, alias)
    session.emit(removed, f"removed the policy of {alias} of {removed['repo']}")


def _print(found: dict[str, Any]) -> None:
    by = f"set by {found['updated_by']} at {found['updated_at']}"
    click.echo(f"{found['alias']} of {found['repo']} ({by}):")
    for line in rule_lines(found["policy"]):
        click.echo(f"  {line}")


def rule_lines(policy: dict[str, Any]) -> list[str]:
    """One line per rule of a policy, as a person reads it."""
    lines = [f"{metric} >= {value}" for metric, value in policy.get("min", {}).items()]
    lines += [f"{metric} <= {value}" for metric, value in policy.get("max", {}).items()]
    for rule in policy.get("no_regression", []):
        better = "higher" if rule.get("higher_is_better", True) else "lower"
        lines.append(
            f"{rule['metric']}: no regression against the current holder "
            f"(tolerance {rule.get('tolerance', 0.0)}, {better} is better)"
        )
    if policy.get("approvals"):
        lines.append(f"{policy['approvals']} approval(s) from people other than the pusher")
    if policy.get("require_signature"):
        lines.append("signature required")
    return lines
