"""The delivery worker every server runs: claim due deliveries, send them, record what happened.

Claims are committed before anything is sent, and outcomes in a transaction of their own afterwards, so
no database transaction is open while a receiver is waited for. A replica that dies mid-delivery leaves
its claim to expire (the lease); another replica then sends it again: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio.to_thread
import httpx

from deltareg.registry.db import Database, unavailable_error
from deltareg.registry.models import utcnow
from deltareg.registry.webhooks.delivery import make_http_client, send
from deltareg.registry.webhooks.repository import Claimed, Outcome, WebhookRepository
from deltareg.registry.webhooks.settings import WebhookSettings

logger = logging.getLogger("deltareg.registry.webhooks")


class DeliveryWorker:
    def __init__(self, database: Database, settings: WebhookSettings, http: httpx.AsyncClient) -> None:
        self.database = database
        self.settings = settings
        self.http = http

    async def run_once(self) -> int:
        """Send one batch of due deliveries; how many were claimed."""
        claimed = await anyio.to_thread.run_sync(self.claim)
        if claimed:
            outcomes = await asyncio.gather(*(send(self.http, item) for item in claimed))
            await anyio.to_thread.run_sync(self.record, list(zip(claimed, outcomes, strict=True)))
        return len(claimed)

    def claim(self) -> list[Claimed]:
        now = utcnow()
        # A plain read first: on SQLite a claim takes the write lock, which an idle poll should not.
        with self.database.read_sessions() as session:
            if not WebhookRepository(session).any_due(now):
                return []
        lease_until = now + timedelta(seconds=self.settings.lease_seconds)
        with self.database.write_sessions() as session, session.begin():
            claimed: list[Claimed] = WebhookRepository(session).claim_due(
                now, lease_until, self.settings.batch_size
            )
            return claimed

    def record(self, results: list[tuple[Claimed, Outcome]]) -> None:
        with self.database.write_sessions() as session, session.begin():
            repository = WebhookRepository(session)
            for claimed, outcome in results:
                failed_attempts = claimed.attempts + 1
                retry_at = None
                if failed_attempts < self.settings.max_attempts:
                    retry_at = utcnow() + timedelta(seconds=self.settings.backoff(failed_attempts))
                if not repository.record(claimed, outcome, retry_at=retry_at):
                    logger.warning(
                        "webhook delivery %s: lease lost before its outcome was recorded", claimed.id
                    )


@contextlib.asynccontextmanager
async def delivering_webhooks(
    database: Database, settings: WebhookSettings | None = None
) -> AsyncIterator[None]:
    """Run the delivery worker while the context is open (not when DELTAREG_WEBHOOK_POLL_SECONDS is 0).

    Every replica runs one: claims are exclusive, so replicas share the work without sending twice.
    """
    settings = settings or WebhookSettings()
    if settings.poll_seconds <= 0:
        yield
        return
    async with make_http_client(settings.timeout_seconds) as http:
        task = asyncio.create_task(_deliver_forever(DeliveryWorker(database, settings, http)))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _deliver_forever(worker: DeliveryWorker) -> None:
    poll = worker.settings.poll_seconds
    while True:
        try:
            full_batch = await worker.run_once() >= worker.settings.batch_size
        except Exception as exc:
            # A database outage must not end the loop (the next poll retries), nor fill the log with
            # tracebacks: it is one line; anything else is a bug and keeps its traceback.
            outage = unavailable_error(exc, worker.database.engine.url.render_as_string(hide_password=False))
            if outage is None:
                logger.exception("webhook delivery failed; retrying in %s s", poll)
            else:
                logger.warning("webhook delivery paused: %s; retrying in %s s", outage.message, poll)
            full_batch = False
        if not full_batch:  # after a full batch more may be due: go on at once
            await asyncio.sleep(poll)
