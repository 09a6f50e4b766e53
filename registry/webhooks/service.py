"""Webhook rules: registering and removing receivers of a repo's events (audited), and their logs."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from deltareg.client.errors import NotFound
from deltareg.client.refs import RepoName
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.models import Webhook
from deltareg.registry.webhooks.repository import WebhookRepository
from deltareg.registry.webhooks.schemas import (
    CreateWebhookRequest,
    DeliveryList,
    WebhookCreated,
    WebhookList,
    WebhookOut,
    delivery_out,
    origin,
    webhook_out,
)

SECRET_PREFIX = "whsec_"


class WebhookService:
    def __init__(self, session: Session) -> None:
        self.webhooks = WebhookRepository(session)
        self.audit = AuditRepository(session)

    def create(
        self, namespace: str, name: str, request: CreateWebhookRequest, *, actor: str
    ) -> WebhookCreated:
        """Register a receiver of ``request.events`` of ``namespace/name``; audited as ``webhook.create``.

        The repo need not exist yet, so a webhook can announce its first push. The secret (given or
        generated) is in the answer only; the audit entry names the receiver's origin, not its full URL
        (a path or query may carry a credential of the receiver's).
        """
        repo = str(RepoName.parse(f"{namespace}/{name}"))
        secret = request.secret or SECRET_PREFIX + secrets.token_urlsafe(32)
        row = self.webhooks.add(
            repo=repo, url=request.url, secret=secret, events=request.events, created_by=actor
        )
        self.audit.append(
            actor=actor,
            action="webhook.create",
            target=_target(row),
            repo=repo,
            details={"id": row.id, "origin": origin(row.url), "events": request.events},
        )
        return WebhookCreated(**webhook_out(row).model_dump(), secret=secret)

    def list(self, namespace: str, name: str) -> WebhookList:
        repo = str(RepoName.parse(f"{namespace}/{name}"))
        return WebhookList(repo=repo, webhooks=[webhook_out(row) for row in self.webhooks.active_for(repo)])

    def delete(self, namespace: str, name: str, webhook_id: int, *, actor: str) -> WebhookOut:
        """Stop sending to webhook ``webhook_id`` (its pending deliveries are dropped, its log kept);
        audited as ``webhook.delete``.

        Raises:
            NotFound: the repo has no such webhook, or it was deleted already.
        """
        row = self._require(namespace, name, webhook_id)
        if not row.active:
            raise NotFound(f"{row.repo} has no webhook {webhook_id} (it was deleted)")
        self.webhooks.deactivate(row)
        self.audit.append(
            actor=actor,
            action="webhook.delete",
            target=_target(row),
            repo=row.repo,
            details={"id": row.id, "origin": origin(row.url), "events": webhook_out(row).events},
        )
        return webhook_out(row)

    def deliveries(self, namespace: str, name: str, webhook_id: int, limit: int) -> DeliveryList:
        """The newest ``limit`` deliveries of a webhook (a deleted one's too)."""
        row = self._require(namespace, name, webhook_id)
        rows = self.webhooks.deliveries(row.id, limit)
        return DeliveryList(repo=row.repo, webhook_id=row.id, deliveries=[delivery_out(d) for d in rows])

    def _require(self, namespace: str, name: str, webhook_id: int) -> Webhook:
        repo = str(RepoName.parse(f"{namespace}/{name}"))
        row = self.webhooks.get(repo, webhook_id)
        if row is None:
            raise NotFound(f"{repo} has no webhook {webhook_id}")
        return row


def _target(row: Webhook) -> str:
    return f"{row.repo}/webhooks/{row.id}"
