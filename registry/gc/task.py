"""The optional periodic garbage collection inside a server (DELTAREG_GC_INTERVAL_SECONDS > 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import anyio.to_thread

from deltareg.registry.db import Database
from deltareg.registry.gc.service import GarbageCollector, GcReport
from deltareg.registry.gc.settings import GcSettings
from deltareg.registry.storage import BlobStore

logger = logging.getLogger("deltareg.registry.gc")


@contextlib.asynccontextmanager
async def periodic_gc(
    database: Database,
    store: BlobStore,
    settings: GcSettings | None = None,
    *,
    on_report: Callable[[GcReport], None] = lambda _report: None,
) -> AsyncIterator[None]:
    """Collect garbage every ``interval_seconds`` while the context is open (nothing when it is 0).

    Every replica may run it: concurrent collections are safe (each removal is one guarded transaction).
    ``on_report`` gets the report of every run that finished (the server counts them in its metrics).
    """
    settings = settings or GcSettings()
    if settings.interval_seconds <= 0:
        yield
        return
    collector = GarbageCollector(database, store, grace=settings.grace)
    task = asyncio.create_task(_collect_forever(collector, settings.interval_seconds, on_report))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _collect_forever(
    collector: GarbageCollector, interval: float, on_report: Callable[[GcReport], None]
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            report = await anyio.to_thread.run_sync(collector.run)
        except Exception:
            # A database or store outage must not end the loop: the next round retries.
            logger.exception("periodic garbage collection failed; retrying in %s s", interval)
        else:
            on_report(report)
