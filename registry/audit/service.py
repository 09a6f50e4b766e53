"""Audit rules: listing the log, and recomputing the hash chain to find the first entry that was changed."""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.refs import RepoName
from deltareg.registry.audit.repository import GENESIS_HASH, AuditRepository, entry_hash
from deltareg.registry.audit.schemas import AuditEntryOut, AuditList, AuditVerification, BrokenEntry
from deltareg.registry.models import AuditEntry


class AuditService:
    def __init__(self, session: Session) -> None:
        self.log = AuditRepository(session)

    def list(self, repo: str | None, *, before_id: int | None, limit: int) -> AuditList:
        """Entries newest first, of one repo if given, one page at a time."""
        repo_name = None if repo is None else str(RepoName.parse(repo))
        entries = self.log.newest_first(repo=repo_name, before_id=before_id, limit=limit)
        next_before = entries[-1].id if len(entries) == limit else None
        return AuditList(entries=[AuditEntryOut.of(e) for e in entries], next_before_id=next_before)

    def verify(self) -> AuditVerification:
        """Walk the chain from the first entry; stop at the first one that does not match."""
        previous_id, previous_hash, count = 0, GENESIS_HASH, 0
        for entry in self.log.walk():
            count += 1
            problem = _problem(entry, previous_id, previous_hash)
            if problem is not None:
                return AuditVerification(
                    ok=False,
                    entries=count,
                    head_hash=None,
                    first_broken=BrokenEntry(id=entry.id, problem=problem),
                )
            previous_id, previous_hash = entry.id, entry.entry_hash
        head = None if count == 0 else previous_hash
        return AuditVerification(ok=True, entries=count, head_hash=head, first_broken=None)


def _problem(entry: AuditEntry, previous_id: int, previous_hash: str) -> str | None:
    if entry.id != previous_id + 1:
        return f"entries {previous_id + 1}..{entry.id - 1} are missing"
    if entry.prev_hash != previous_hash:
        return "its prev_hash does not match the hash of the entry before it"
    if entry_hash(entry) != entry.entry_hash:
        return "its content does not match its hash (the entry was changed)"
    return None
