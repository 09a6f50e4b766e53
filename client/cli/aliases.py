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
        if text.isdigit() and not text.startswith("0") and int(text) <= MAX_VERSION:
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
