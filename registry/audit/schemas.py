from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from deltareg.registry.models import AuditEntry


class AuditEntryOut(BaseModel):
    id: int
    created_at: datetime
    actor: str
    action: str = Field(
        description="push, eval, alias.promote, alias.rollback, policy.set, approve, yank, ...; "
        "a refused write is recorded as '<action>.refused'"
    )
    repo: str | None
    target: str
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditEntryOut:
        return cls(
            id=entry.id,
            created_at=entry.created_at,
            actor=entry.actor,
            action=entry.action,
            repo=entry.repo,
            target=entry.target,
            details=json.loads(entry.details),
            prev_hash=entry.prev_hash,
            entry_hash=entry.entry_hash,
        )


class AuditList(BaseModel):
    entries: list[AuditEntryOut] = Field(description="newest first")
    next_before_id: int | None = Field(
        description="pass as before_id for the next (older) page; null at the end"
    )


class BrokenEntry(BaseModel):
    id: int
    problem: str


class AuditVerification(BaseModel):
    ok: bool
    entries: int = Field(description="entries checked (up to and including the first broken one)")
    head_hash: str | None = Field(description="the newest entry's hash when the chain is intact")
    first_broken: BrokenEntry | None
