"""Webhook requests and answers, the events a webhook can subscribe to, and the payload it receives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltareg.registry.models import WEBHOOK_URL_LENGTH, AuditEntry, Webhook, WebhookDelivery

# Event names are the audit actions of the writes they announce.
WEBHOOK_EVENTS = ("push", "eval", "alias.promote", "alias.rollback", "yank")
DeliveryStatus = Literal["pending", "delivered", "failed"]
SECRET_MIN_LENGTH = 16


class CreateWebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=WEBHOOK_URL_LENGTH, description="http:// or https:// URL events are POSTed to"
    )
    events: list[str] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description=f"events to send, from {', '.join(WEBHOOK_EVENTS)} (default: all)",
    )
    secret: str | None = Field(
        default=None,
        min_length=SECRET_MIN_LENGTH,
        max_length=256,
        description="HMAC key of the signatures (default: generated); shown once, in the answer",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        check_url(url)
        return url

    @field_validator("events")
    @classmethod
    def _known_events(cls, events: list[str]) -> list[str]:
        unknown = [event for event in events if event not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(
                f"unknown event {unknown[0][:64]!r}: expected some of {', '.join(WEBHOOK_EVENTS)}"
            )
        return sorted(set(events))

    @field_validator("secret")
    @classmethod
    def _printable_secret(cls, secret: str | None) -> str | None:
        if secret is not None and not (
            secret.isascii() and secret.isprintable() and secret.strip() == secret
        ):
            raise ValueError("the secret must be printable ASCII without leading or trailing spaces")
        return secret


def check_url(url: str) -> None:
    """ValueError saying what is wrong unless ``url`` is an absolute http(s) URL with a host."""
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError("the URL must be printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the URL must start with http:// or https://, not {parts.scheme or 'nothing'}")
    if not parts.hostname:
        raise ValueError("the URL has no host")


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what the audit log records (paths may hold credentials)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class WebhookOut(BaseModel):
    id: int
    repo: str
    url: str
    events: list[str]
    active: bool
    created_by: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the HMAC key of the signatures: shown once, never listed")


class WebhookList(BaseModel):
    repo: str
    webhooks: list[WebhookOut] = Field(description="active webhooks, oldest first")


class DeliveryOut(BaseModel):
    id: str = Field(description="the X-Deltareg-Delivery header: the same on every attempt")
    event: str
    audit_entry_id: int
    status: DeliveryStatus
    attempts: int = Field(
        description="attempts made so far (a delivery cut short by a restart is not counted)"
    )
    next_attempt_at: datetime | None = Field(description="when it is tried again (pending only)")
    last_status_code: int | None = Field(description="the receiver's HTTP status at the latest attempt")
    last_error: str | None = Field(description="what went wrong at the latest failed attempt")
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    repo: str
    webhook_id: int
    deliveries: list[DeliveryOut] = Field(description="newest first")


def webhook_out(row: Webhook) -> WebhookOut:
    return WebhookOut(
        id=row.id,
        repo=row.repo,
        url=row.url,
        events=json.loads(row.events),
        active=row.active,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        event=row.event,
        audit_entry_id=row.audit_entry_id,
        status=row.status,  # type: ignore[arg-type]  # only the three statuses are ever written
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def event_payload(entry: AuditEntry, delivery_id: str) -> str:
    """The JSON body a receiver gets for the audit entry ``entry``: what happened, to what, by whom."""
    body: dict[str, Any] = {
        "delivery": delivery_id,
        "event": entry.action,
        "repo": entry.repo,
        "target": entry.target,
        "actor": entry.actor,
        "time": entry.created_at.astimezone(UTC).isoformat(),
        "audit_entry_id": entry.id,
        "details": json.loads(entry.details),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)
