"""``deltareg token create|list|revoke|whoami``: API tokens (creating, listing and revoking needs admin)."""

from __future__ import annotations

from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session

SCOPES = ("read", "write", "promote", "admin")


@cli.group()
def token() -> None:
    """API tokens: who may read, push (write), move aliases (promote) or administer (admin), where."""


@token.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(SCOPES),
    help="read; write (push, eval); promote (alias moves, approvals, yank); admin. Repeatable.",
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    metavar="PATTERN",
    help='Namespaces the token may act on: "acme", "team-*" or "*" (default). Repeatable.',
)
@click.option("--expires-in-days", type=click.IntRange(1, 3650), default=90, show_default=True)
@click.option("--no-expiry", is_flag=True, help="A token that never expires.")
@with_session
def create(
    session: Session,
    name: str,
    scopes: tuple[str, ...],
    namespaces: tuple[str, ...],
    expires_in_days: int,
    no_expiry: bool,
) -> None:
    """Create an API token NAME (the actor its writes record) and print its secret, shown this once."""
    created = session.registry.create_token(
        name,
        scopes,
        namespaces=namespaces or ("*",),
        expires_in_days=None if no_expiry else expires_in_days,
    )
    expiry = created["expires_at"] or "never"
    session.note(
        f"created token {created['id']} {created['name']} ({', '.join(created['scopes'])} on "
        f"{', '.join(created['namespaces'])}, expires {expiry}); the secret below is not shown again"
    )
    session.emit(created, created["token"])


@token.command("list")
@with_session
def list_(session: Session) -> None:
    """Every API token: id, name, scopes, namespaces, expiry, revocation (never secrets)."""
    tokens = session.registry.tokens()

    def table() -> None:
        for item in tokens:
            click.echo(_line(item))

    session.emit(tokens, table)


def _line(item: dict[str, Any]) -> str:
    state = (
        f"revoked by {item['revoked_by']}"
        if item["revoked_at"]
        else f"expires {item['expires_at'] or 'never'}"
    )
    return (
        f"{item['id']:>4}  {item['name']:<20} {','.join(item['scopes']):<22} "
        f"{','.join(item['namespaces']):<16} {state}"
    )


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(1))
@with_session
def revoke(session: Session, token_id: int) -> None:
    """Revoke the token TOKEN_ID: it is refused from its next request on."""
    revoked = session.registry.revoke_token(token_id)
    session.emit(revoked, f"revoked token {revoked['id']} ({revoked['name']})")


@token.command("whoami")
@with_session
def whoami(session: Session) -> None:
    """Who this CLI's token is, with its scopes and namespaces."""
    me = session.registry.whoami()
    session.emit(
        me, f"{me['name']}: {', '.join(me['scopes']) or 'no scopes'} on {', '.join(me['namespaces'])}"
    )
