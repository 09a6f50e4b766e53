"""All SQL of webhooks: subscriptions, the delivery outbox, and the worker's claims and outcomes."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from deltareg.registry.models import AuditEntry, Webhook, WebhookDelivery, utcnow
from deltareg.registry.webhooks.schemas import WEBHOOK_EVENTS, event_payload

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Claimed:
    """A delivery a worker holds until ``lease_until``: everything it needs to send it, detached from
    the session."""

    id: str
    event: str
    url: str
    secret: str
    payload: str
    attempts: int
    lease_until: datetime


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: a 2xx status is a delivery, anything else (or an error) a failure."""

    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # ---- subscriptions

    def add(self, *, repo: str, url: str, secret: str, events: list[str], created_by: str) -> Webhook:
        row = Webhook(
            repo=repo, url=url, secret=secret, events=json.dumps(sorted(events)), created_by=created_by
        )
        self.session.add(row)
        self.session.flush()
        return row

    def active_for(self, repo: str) -> list[Webhook]:
        statement = select(Webhook).where(Webhook.repo == repo, Webhook.active).order_by(Webhook.id)
        return list(self.session.scalars(statement))

    def get(self, repo: str, webhook_id: int) -> Webhook | None:
        return self.session.scalar(select(Webhook).where(Webhook.id == webhook_id, Webhook.repo == repo))

    def deactivate(self, webhook: Webhook) -> None:
        """Switch ``webhook`` off; its pending deliveries are marked failed rather than sent."""
        webhook.active = False
        self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook.id, WebhookDelivery.status == PENDING)
            .values(status=FAILED, last_error="the webhook was deleted before this was delivered")
        )

    def deliveries(self, webhook_id: int, limit: int) -> list[WebhookDelivery]:
        statement = (
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.audit_entry_id.desc(), WebhookDelivery.id)
            .limit(limit)
        )
        return list(self.session.scalars(statement))

    # ---- the outbox

    def enqueue(self, entry: AuditEntry) -> None:
        """Queue one delivery of ``entry`` per active webhook of its repo subscribed to its action.

        Called in the transaction of the write the entry records: a write that rolls back queues nothing,
        one that commits always has its deliveries.
        """
        if entry.action not in WEBHOOK_EVENTS or entry.repo is None:
            return
        for webhook in self.active_for(entry.repo):
            if entry.action in json.loads(webhook.events):
                delivery_id = str(uuid.uuid4())
                self.session.add(
                    WebhookDelivery(
                        id=delivery_id,
                        webhook_id=webhook.id,
                        event=entry.action,
                        audit_entry_id=entry.id,
                        payload=event_payload(entry, delivery_id),
                        status=PENDING,
                        attempts=0,
                        next_attempt_at=entry.created_at,
                    )
                )
        self.session.flush()

    # ---- the delivery worker

    def any_due(self, now: datetime) -> bool:
        statement = select(WebhookDelivery.id).where(
            WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now
        )
        return self.session.scalar(statement.limit(1)) is not None

    def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[Claimed]:
        """Take up to ``limit`` due deliveries by pushing them to ``lease_until`` (commit to hold them).

        PostgreSQL: rows another replica is claiming are skipped, not waited for (SKIP LOCKED); SQLite
        has one writer at a time, so claims follow each other.
        """
        statement = (
            select(WebhookDelivery, Webhook)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        )
        claimed = []
        for delivery, webhook in self.session.execute(statement):
            delivery.next_attempt_at = lease_until
            claimed.append(
                Claimed(
                    id=delivery.id,
                    event=delivery.event,
                    url=webhook.url,
                    secret=webhook.secret,
                    payload=delivery.payload,
                    attempts=delivery.attempts,
                    lease_until=lease_until,
                )
            )
        self.session.flush()
        return claimed

    def record(self, claimed: Claimed, outcome: Outcome, *, retry_at: datetime | None) -> bool:
        """Record the attempt; ``retry_at`` None after a failure means out of attempts (failed).

        Only while the claim still holds (the row still carries this lease): if the lease ran out and
        another worker claimed the delivery, that worker's attempt is the one recorded. False then.
        """
        values: dict[str, object] = {
            "attempts": claimed.attempts + 1,
            "last_status_code": outcome.status_code,
        }
        if outcome.delivered:
            values |= {"status": DELIVERED, "delivered_at": utcnow()}
        else:
            values["last_error"] = outcome.error
            if retry_at is None:
                values["status"] = FAILED
            else:
                values["next_attempt_at"] = retry_at
        result = self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == claimed.id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at == claimed.lease_until,
            )
            .values(**values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]
