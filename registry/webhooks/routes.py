from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep
from deltareg.registry.webhooks.schemas import (
    CreateWebhookRequest,
    DeliveryList,
    WebhookCreated,
    WebhookList,
    WebhookOut,
)
from deltareg.registry.webhooks.service import WebhookService

router = APIRouter(prefix="/api/v1/repos/{namespace}/{name}/webhooks", tags=["webhooks"])

CreateBody = Annotated[
    CreateWebhookRequest, Depends(json_body(CreateWebhookRequest, lambda s: s.max_json_bytes))
]
# The column is an INTEGER: PostgreSQL refuses ids beyond 2**31 - 1 (a 500, not a 404, without this bound).
WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def get_webhook_service(session: SessionDep) -> WebhookService:
    return WebhookService(session)


WebhookServiceDep = Annotated[WebhookService, Depends(get_webhook_service)]


@router.post("", status_code=201, openapi_extra=openapi_body(CreateWebhookRequest))
def create_webhook(
    namespace: str, name: str, body: CreateBody, service: WebhookServiceDep, refusals: RefusalsDep
) -> WebhookCreated:
    """Register a receiver of the repo's events (admin): ``push``, ``eval``, ``alias.promote``,
    ``alias.rollback``, ``yank`` (default: all). The repo need not exist yet.

    Each event is POSTed as JSON with ``X-Deltareg-Event``, ``X-Deltareg-Delivery``,
    ``X-Deltareg-Timestamp`` and ``X-Deltareg-Signature: sha256=<HMAC-SHA256(secret, timestamp + "." +
    body)>``, retried with backoff until the receiver answers 2xx. The secret (given, or generated) is in
    this answer only. Audited as ``webhook.create`` (never with the secret).
    """
    refusals.watch("webhook.create", f"{namespace}/{name}/webhooks", repo=f"{namespace}/{name}")
    return service.create(namespace, name, body, actor=refusals.actor)


@router.get("")
def list_webhooks(namespace: str, name: str, service: WebhookServiceDep) -> WebhookList:
    """The repo's active webhooks, oldest first (admin): URLs and events, never secrets."""
    return service.list(namespace, name)


@router.delete("/{webhook_id}")
def delete_webhook(
    namespace: str, name: str, webhook_id: WebhookId, service: WebhookServiceDep, refusals: RefusalsDep
) -> WebhookOut:
    """Stop sending to a webhook (admin); deliveries not yet made are dropped, its log stays readable.
    Audited as ``webhook.delete``."""
    refusals.watch("webhook.delete", f"{namespace}/{name}/webhooks/{webhook_id}", repo=f"{namespace}/{name}")
    return service.delete(namespace, name, webhook_id, actor=refusals.actor)


@router.get("/{webhook_id}/deliveries")
def list_deliveries(
    namespace: str,
    name: str,
    webhook_id: WebhookId,
    service: WebhookServiceDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> DeliveryList:
    """A webhook's deliveries, newest first (admin): status, attempts, the receiver's last status code
    and the last error."""
    return service.deliveries(namespace, name, webhook_id, limit)
