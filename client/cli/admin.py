"""``deltareg db``: the server's database schema (Alembic migrations), run where the server runs.

These commands talk to the database directly with the server's settings (DELTAREG_DATABASE_URL, or the
embedded default in DELTAREG_DATA_DIR), not to a registry over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import click

from deltareg.client.cli import cli


def _server() -> Any:
    """The server's migration module, imported only when a db command runs (needs deltareg[server])."""
    try:
        from deltareg.registry import migrate
    except ImportError as exc:
        raise click.UsageError(
            f"the server is not installed ({exc}); pip install 'deltareg[server]'"
        ) from exc
    return migrate


def _database_url(explicit: str | None) -> str:
    from deltareg.registry.config import Settings

    settings = Settings(database_url=explicit) if explicit else Settings()
    return settings.database_url


database_url_option = click.option(
    "--database-url",
    default=None,
    metavar="URL",
    help="Database to use (default: DELTAREG_DATABASE_URL, else the embedded default in DELTAREG_DATA_DIR).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


@cli.group("db")
def db() -> None:
    """The registry database schema: apply migrations, show the revision."""


@db.command("upgrade")
@database_url_option
@json_option
def upgrade(database_url: str | None, as_json: bool) -> None:
    """Apply every pending migration; prints the revision reached."""
    migrate = _server()
    url = _database_url(database_url)
    before = migrate.current_revision(url)
    reached = migrate.upgrade(url)
    where = _safe(url)
    if as_json:
        click.echo(json.dumps({"database": where, "previous": before, "revision": reached, "head": reached}))
    elif before == reached:
        click.echo(f"database {where} is already at revision {reached} (head)")
    else:
        click.echo(
            f"database {where} upgraded from {before or 'an empty schema'} to revision {reached} (head)"
        )


@db.command("current")
@database_url_option
@json_option
def current(database_url: str | None, as_json: bool) -> None:
    """Show the database's schema revision and the newest one this server knows."""
    migrate = _server()
    url = _database_url(database_url)
    revision = migrate.current_revision(url)
    head = migrate.head_revision()
    if as_json:
        payload = {"database": _safe(url), "current": revision, "head": head, "up_to_date": revision == head}
        click.echo(json.dumps(payload))
        return
    click.echo(f"current: {revision or '(empty: no deltareg schema)'}")
    click.echo(f"head:    {head}")
    if revision != head:
        click.echo(f"the schema is not current; run `{migrate.UPGRADE_COMMAND}`", err=True)


def _safe(url: str) -> str:
    from deltareg.registry.db import safe_url

    return str(safe_url(url))
