"""All SQL of the audit log: appending a chained entry under a lock, listing, walking the chain."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import rfc8785
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from deltareg.registry.models import AuditEntry, utcnow
from deltareg.registry.webhooks.repository import WebhookRepository

GENESIS_HASH = "sha256:" + "0" * 64
# One key for the whole log: appends are serialized so that each entry chains onto the one before it.
# (SQLite needs no lock: a write transaction there already holds the database's write lock.)
_POSTGRES_AUDIT_LOCK = 0x64656C7461  # "delta"
_WALK_BATCH = 1000


def entry_hash(entry: AuditEntry) -> str:
    """The hash an entry must carry: sha256 of the canonical JSON of its fields and ``prev_hash``."""
    body: dict[str, Any] = {
        "id": entry.id,
        "created_at": entry.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": entry.actor,
        "action": entry.action,
        "repo": entry.repo,
        "target": entry.target,
        "details": entry.details,
        "prev_hash": entry.prev_hash,
    }
    return "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()


def canonical_details(details: dict[str, Any]) -> str:
    return rfc8785.dumps(details).decode("utf-8")


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def append(
        self, *, actor: str, action: str, target: str, repo: str | None, details: dict[str, Any]
    ) -> AuditEntry:
        """Append an entry chained onto the newest one, in the caller's transaction.

        The lock is held until that transaction ends, so call this as the last statement of a write:
        every concurrent write waits here for the ones before it to commit or roll back.
        """
        self._lock()
        last = self.session.execute(
            select(AuditEntry.id, AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1)
        ).first()
        entry = AuditEntry(
            id=1 if last is None else last.id + 1,
            created_at=utcnow(),
            actor=actor,
            action=action,
            repo=repo,
            target=target,
            details=canonical_details(details),
            prev_hash=GENESIS_HASH if last is None else last.entry_hash,
        )
        entry.entry_hash = entry_hash(entry)
        self.session.add(entry)
        self.session.flush()
        # The webhook outbox: deliveries of this entry commit (or roll back) with the write itself.
        WebhookRepository(self.session).enqueue(entry)
        return entry

    def _lock(self) -> None:
        if self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_AUDIT_LOCK})

    def newest_first(self, *, repo: str | None, before_id: int | None, limit: int) -> list[AuditEntry]:
        statement = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if repo is not None:
            statement = statement.where(AuditEntry.repo == repo)
        if before_id is not None:
            statement = statement.where(AuditEntry.id < before_id)
        return list(self.session.scalars(statement))

    def walk(self) -> Iterator[AuditEntry]:
        """Every entry in chain order, read in batches (the log can be long)."""
        after = 0
        while True:
            batch = list(
                self.session.scalars(
                    select(AuditEntry).where(AuditEntry.id > after).order_by(AuditEntry.id).limit(_WALK_BATCH)
                )
            )
            yield from batch
            if len(batch) < _WALK_BATCH:
                return
            after = batch[-1].id
            self.session.expunge_all()  # keep memory flat on long logs
