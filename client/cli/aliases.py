"""``deltareg promote`` and ``deltareg aliases``: moving aliases by compare-and-swap, and listing them."""

from __future__ import annotations

from typing import Any, Literal

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session
from deltareg.client.refs import MAX_VERSION

# Without --expect: read the alias's current holder first and expect that one.
READ_CURRENT = "current"


class ExpectedHolder(click.ParamType[int | None | Literal["current"], Any]):
    """``--expect``: a version number, or ``none`` for "the alias must not exist yet"."""

    name = "N|none"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None | Literal["current"]:
        if value is None or isinstance(value, int) or value == READ_CURRENT:
            return value  # type: ignore[no-any-return]  # one of the three accepted values
        text = str(value).strip().lower()
        if text == "none":
            return None
        if (
            text.isascii()
            and text.isdigit()
            and len(text) <= 10
            and not text.startswith("0")
            and int(text) <= MAX_VERSION
        ):
            return int(text)
        self.fail(f"{value!r} is not a version number (1, 2, ...) or 'none'", param, ctx)


@cli.command()
@click.argument("ref")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias to move, e.g. production.")
@click.option(
    "--expect",
    "expected",
    type=ExpectedHolder(),
    default=READ_CURRENT,
    show_default=False,
    help="The version the alias points to now ('none': it must not exist yet). Default: read it first; "
    "a concurrent move then still fails instead of being overwritten.",
)
@click.option("--reason", default=None, metavar="TEXT", help="Why; kept in the alias history.")
@with_session
def promote(
    session: Session, ref: str, alias: str, expected: int | None | Literal["current"], reason: str | None
) -> None:
    """Point ALIAS at the version REF names (compare-and-swap: a concurrent move fails, exit 1)."""
    moved = session.registry.promote(ref, alias, expected=expected, reason=reason)
    where = f"{moved['name']} of {moved['repo']}"
    if not moved["moved"]:
        human = f"{where} already points to {moved['version']} ({moved['digest']}); nothing changed"
    elif moved["previous"] is None:
        human = f"created {where} -> {moved['version']} ({moved['digest']})"
    else:
        human = f"moved {where}: {moved['previous']} -> {moved['version']} ({moved['digest']})"
    session.emit(moved, human)


@cli.command("aliases")
@click.argument("repo")
@with_session
def aliases_(session: Session, repo: str) -> None:
    """List the aliases of REPO and the versions they point to."""
    aliases = session.registry.aliases(repo)

    def table() -> None:
        if not aliases:
            click.echo(f"{repo} has no aliases")
        for a in aliases:
            click.echo(f"{a['name']}\t{repo}:{a['version']}\t{a['digest']}\t{a['updated_at']}")

    session.emit({"repo": repo, "aliases": aliases}, table)


@cli.command()
@click.argument("ref")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias you approve moving to REF.")
@click.option("--comment", default=None, metavar="TEXT", help="Kept with the approval.")
@with_session
def approve(session: Session, ref: str, alias: str, comment: str | None) -> None:
    """Approve moving ALIAS to the version REF names (as DELTAREG_ACTOR; not the version's pusher)."""
    approval = session.registry.approve(ref, alias, comment=comment)
    target = f"{approval['repo']}:{approval['version']}"
    if approval["created"]:
        human = f"{approval['actor']} approved moving {alias} to {target}"
    else:
        human = f"{approval['actor']} had already approved moving {alias} to {target}; nothing changed"
    session.emit(approval, human)


@cli.command()
@click.argument("repo")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias to move back.")
@click.option(
    "--to",
    "to",
    type=click.IntRange(1, MAX_VERSION),
    default=None,
    metavar="N",
    help="A version that held the alias before (default: the previous holder that is not yanked).",
)
@click.option("--reason", default=None, metavar="TEXT", help="Why; kept in the alias history.")
@with_session
def rollback(session: Session, repo: str, alias: str, to: int | None, reason: str | None) -> None:
    """Move ALIAS of REPO back to its previous holder that is not yanked (or to --to N).

    Repeated rollbacks keep going back through the promotions. The alias's policy is not applied: the
    version held the alias before. A concurrent move of the alias makes this fail (exit 1).
    """
    moved = session.registry.rollback(repo, alias, to=to, reason=reason)
    human = f"rolled back {moved['name']} of {moved['repo']}: {moved['previous']} -> {moved['version']} "
    session.emit(moved, human + f"({moved['digest']})")


@cli.command()
@click.argument("ref")
@click.option("--reason", required=True, metavar="TEXT", help="Why the version is bad (shown to pullers).")
@click.option(
    "--rollback",
    "rollback_aliases",
    is_flag=True,
    help="Roll back every alias pointing to the version (without it, yanking an alias holder fails).",
)
@with_session
def yank(session: Session, ref: str, reason: str, rollback_aliases: bool) -> None:
    """Yank the version REF names: pulls refuse it unless named exactly with --allow-yanked.

    It stays readable (deltareg show). No alias may point to it: with --rollback, each alias pointing to
    it moves back to its previous holder that is not yanked.
    """
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="--reason")
    result = session.registry.yank(ref, reason, rollback=rollback_aliases)

    def report() -> None:
        click.echo(f"yanked {result['repo']}:{result['number']} ({result['digest']}): {reason.strip()}")
        for moved in result["rolled_back"]:
            click.echo(f"rolled back {moved['alias']}: {moved['previous']} -> {moved['version']}")

    session.emit(result, report)
