"""``deltareg webhook add|list|remove|deliveries``: receivers of a repo's events (needs admin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session

EVENTS = ("push", "eval", "alias.promote", "alias.rollback", "yank")


@cli.group()
def webhook() -> None:
    """Webhooks: signed HTTP POSTs to a receiver on push, eval, alias moves and yanks of a repo."""


@webhook.command("add")
@click.argument("repo")
@click.argument("receiver", metavar="URL")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice(EVENTS),
    help="An event to send (repeatable; default: all of them).",
)
@click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Read the signing secret (16+ characters) from FILE instead of having one generated.",
)
@with_session
def add(
    session: Session, repo: str, receiver: str, events: tuple[str, ...], secret_file: Path | None
) -> None:
    """Send events of REPO to URL (http or https), each signed with the webhook's secret.

    A generated secret is printed once, on stdout; keep it to verify X-Deltareg-Signature.
    """
    secret = _read_secret(secret_file) if secret_file else None
    created = session.registry.add_webhook(repo, receiver, events=events or None, secret=secret)
    summary = (
        f"added webhook {created['id']} on {created['repo']}: {', '.join(created['events'])} -> "
        f"{created['url']}"
    )
    if secret is not None:
        session.emit(created, summary)
        return
    session.note(f"{summary}; its secret below is not shown again")
    session.emit(created, created["secret"])


def _read_secret(path: Path) -> str:
    secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not secret:
        raise click.BadParameter(f"{path} is empty", param_hint="--secret-file")
    return secret


@webhook.command("list")
@click.argument("repo")
@with_session
def list_(session: Session, repo: str) -> None:
    """The active webhooks of REPO: id, events, URL (never secrets)."""
    hooks = session.registry.webhooks(repo)

    def table() -> None:
        if not hooks:
            click.echo(f"{repo} has no webhooks")
        for item in hooks:
            click.echo(f"{item['id']:>4}  {','.join(item['events']):<44} {item['url']}")

    session.emit(hooks, table)


@webhook.command("remove")
@click.argument("repo")
@click.argument("webhook_id", type=click.IntRange(1))
@with_session
def remove(session: Session, repo: str, webhook_id: int) -> None:
    """Stop sending to webhook WEBHOOK_ID of REPO (its delivery log stays readable)."""
    removed = session.registry.remove_webhook(repo, webhook_id)
    session.emit(removed, f"removed webhook {removed['id']} of {removed['repo']} ({removed['url']})")


@webhook.command("deliveries")
@click.argument("repo")
@click.argument("webhook_id", type=click.IntRange(1))
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)
@with_session
def deliveries(session: Session, repo: str, webhook_id: int, limit: int) -> None:
    """The newest deliveries of webhook WEBHOOK_ID of REPO: status, attempts, the receiver's answer."""
    items = session.registry.webhook_deliveries(repo, webhook_id, limit=limit)

    def table() -> None:
        if not items:
            click.echo(f"webhook {webhook_id} of {repo} has no deliveries yet")
        for item in items:
            click.echo(_line(item))

    session.emit(items, table)


def _line(item: dict[str, Any]) -> str:
    answer = item["last_status_code"] if item["last_status_code"] is not None else "-"
    line = (
        f"{item['created_at']}  {item['id']}  {item['event']:<14} {item['status']:<9} "
        f"attempts {item['attempts']}  last answer {answer}"
    )
    if item["status"] == "pending" and item["next_attempt_at"]:
        line += f"  next {item['next_attempt_at']}"
    if item["last_error"]:
        line += f"  ({item['last_error']})"
    return line
