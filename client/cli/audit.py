"""``deltareg audit``, ``deltareg audit verify`` and ``deltareg history``: who changed what, and when."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session

VERIFY = "verify"


class Moment(click.ParamType[datetime, Any]):
    """An ISO 8601 time; without a UTC offset it is the local time of this machine."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2026-11-29T14:00:00Z)", param, ctx)
        return moment if moment.tzinfo is not None else moment.astimezone()


@cli.command()
@click.argument("repo", metavar="[REPO | verify]", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--before", "before_id", type=click.IntRange(min=1), default=None, help="Entries older than ID."
)
@with_session
def audit(session: Session, repo: str | None, limit: int, before_id: int | None) -> None:
    """List the audit log (of REPO), newest first; `deltareg audit verify` checks its hash chain (exit 3
    when an entry was changed, removed or reordered)."""
    if repo == VERIFY:
        report = session.registry.verify_audit()
        head = report["head_hash"] or "(empty log)"
        session.emit(report, f"audit log intact: {report['entries']} entries, head {head}")
        return
    page = session.registry.audit(repo, limit=limit, before_id=before_id)

    def table() -> None:
        if not page["entries"]:
            click.echo("no audit entries")
        for e in page["entries"]:
            details = json.dumps(e["details"], sort_keys=True)
            click.echo(f"{e['id']}\t{e['created_at']}\t{e['actor']}\t{e['action']}\t{e['target']}\t{details}")
        if page["next_before_id"] is not None:
            click.echo(f"(older entries: --before {page['next_before_id']})", err=True)

    session.emit(page, table)


@cli.command()
@click.argument("repo")
@click.option("--alias", "alias", required=True, metavar="NAME", help="The alias, e.g. production.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@with_session
def history(session: Session, repo: str, alias: str, limit: int) -> None:
    """Every move of an alias of REPO, newest first: kind, from -> to, reason, actor, time."""
    moves = session.registry.alias_history(repo, alias, limit=limit)

    def table() -> None:
        for m in moves:
            source = "(created)" if m["from_version"] is None else str(m["from_version"])
            reason = f"\t{m['reason']}" if m["reason"] else ""
            click.echo(f"{m['at']}\t{m['kind']}\t{source} -> {m['to_version']}\t{m['actor'] or '-'}{reason}")

    session.emit({"repo": repo, "alias": alias, "moves": moves}, table)
