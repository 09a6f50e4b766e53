"""``deltareg result record|list``: the recorded fingerprints of the model a version yields on its base."""

from __future__ import annotations

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session


@cli.group()
def result() -> None:
    """Result fingerprints: the tmv1: fingerprint of the model a version yields, one per base dtype."""


@result.command("record")
@click.argument("ref")
@click.argument("fingerprint")
@click.option(
    "--dtype",
    "base_dtype",
    required=True,
    metavar="DTYPE",
    help="The base's dtype the result was computed in: BF16, F16, F32 or F64.",
)
@with_session
def record(session: Session, ref: str, fingerprint: str, base_dtype: str) -> None:
    """Record FINGERPRINT (tmv1:...) as the model REF yields on a DTYPE base.

    Results are immutable: recording the same fingerprint again changes nothing; a different one for
    the same dtype is refused (exit 1).
    """
    recorded = session.registry.record_result(ref, base_dtype, fingerprint)
    where = f"{recorded['repo']}:{recorded['number']} {recorded['base_dtype']}"
    verb = "recorded" if recorded["created"] else "already recorded"
    session.emit(recorded, f"{verb} on {where}: {recorded['fingerprint']}")


@result.command("list")
@click.argument("ref")
@with_session
def list_(session: Session, ref: str) -> None:
    """The result fingerprints recorded on the version REF names, one line per base dtype."""
    found = session.registry.results(ref)

    def table() -> None:
        if not found:
            click.echo("no results recorded")
        for item in found:
            by = f"  by {item['actor']}" if item.get("actor") else ""
            click.echo(f"{item['base_dtype']:<5} {item['fingerprint']}{by}  {item['created_at']}")

    session.emit(found, table)
