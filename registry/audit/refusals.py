"""Refused writes are audited too: a write that fails with a 4xx leaves one '<action>.refused' entry.

The write itself is rolled back first (nothing of it stays); the refusal is then appended and committed
in the same request session, before the error goes back to the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends

from deltareg.client.errors import DeltaregError, InvalidInput
from deltareg.client.refs import RepoName
from deltareg.registry.audit.actor import ActorDep
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.deps import SessionDep

TARGET_LENGTH = 512  # models.AuditEntry.target


@dataclass
class Refusals:
    """Set by a write route before it calls its service: what to record if the write is refused."""

    actor: str
    action: str | None = None
    target: str = ""
    repo: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def watch(self, action: str, target: str, *, repo: str | None, **details: Any) -> None:
        """Record ``action`` on ``target`` as refused if the write fails with a 4xx.

        The repo and target come from the request's path and may be anything a client sent: a repo name
        that is not valid is not filed under a repo, and the target is escaped and cut to the column's length.
        """
        self.action, self.target, self.details = action, _printable(target)[:TARGET_LENGTH], details
        self.repo = _valid_repo(repo)


def _printable(text: str) -> str:
    """Control characters (a NUL cannot even be stored in PostgreSQL text) as escapes."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _valid_repo(repo: str | None) -> str | None:
    if repo is None:
        return None
    try:
        return str(RepoName.parse(repo))
    except InvalidInput:
        return None


def audit_refusals(session: SessionDep, actor: ActorDep) -> Iterator[Refusals]:
    refusals = Refusals(actor=actor)
    try:
        yield refusals
    except DeltaregError as exc:
        if refusals.action is not None and 400 <= exc.status_code < 500:
            session.rollback()
            AuditRepository(session).append(
                actor=actor,
                action=f"{refusals.action}.refused",
                target=refusals.target,
                repo=refusals.repo,
                details={**refusals.details, "error": exc.code, "detail": exc.message},
            )
            session.commit()
        raise


# scope="function": torn down before the session's own teardown, while the session is still usable.
RefusalsDep = Annotated[Refusals, Depends(audit_refusals, scope="function")]
