"""``deltareg gc``: remove blobs no version references (an operator command, run beside the server).

It reads the server's own ``DELTAREG_*`` settings (database and store), like ``deltareg db upgrade``, and
is safe while servers are running: see ``deltareg.registry.gc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from deltareg.client.cli import cli

if TYPE_CHECKING:
    from deltareg.registry.gc.service import GcReport


@cli.command("gc")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Keep unreferenced blobs younger than this [env var: DELTAREG_GC_GRACE_SECONDS; default 86400].",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def gc(grace: float | None, dry_run: bool, as_json: bool) -> None:
    """Remove blobs that no version references, once older than the grace period.

    Uses the server's settings (DELTAREG_DATABASE_URL, DELTAREG_STORAGE_URL, ...); safe to run while
    servers are pushing: a blob a push is about to reference is never removed.
    """
    report = _collect(grace, dry_run)
    if as_json:
        import json

        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _print_report(report)


def _collect(grace: float | None, dry_run: bool) -> GcReport:
    try:
        from deltareg.registry.config import Settings
        from deltareg.registry.db import Database
        from deltareg.registry.gc.service import GarbageCollector
        from deltareg.registry.gc.settings import GcSettings
        from deltareg.registry.migrate import check_schema
        from deltareg.registry.storage import open_store
    except ImportError as exc:
        hint = "pip install 'deltareg[server]'"
        raise click.UsageError(f"the server is not installed ({exc}); {hint}") from exc
    settings = Settings()
    check_schema(settings.database_url)  # an outdated schema: say which command to run
    gc_settings = GcSettings() if grace is None else GcSettings(grace_seconds=grace)
    store = open_store(settings.storage_url, settings)
    database = Database.connect(settings.database_url)
    try:
        return GarbageCollector(database, store, grace=gc_settings.grace).run(dry_run=dry_run)
    finally:
        database.dispose()


def _print_report(report: GcReport) -> None:
    verb = "would remove" if report.dry_run else "removed"
    for item in report.blobs:
        click.echo(f"{verb} unreferenced blob {item.name} ({item.size} bytes)")
    for item in report.strays:
        click.echo(f"{verb} unrecorded store object {item.name} ({item.size} bytes)")
    uploads = "" if report.uploads is None else f", {report.uploads} upload leftovers"
    click.echo(
        f"{verb} {len(report.blobs)} unreferenced blobs and {len(report.strays)} unrecorded objects "
        f"({report.removed_bytes} bytes){uploads}; grace {report.grace_seconds:g} s"
    )
