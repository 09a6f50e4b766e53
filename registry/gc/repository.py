"""All SQL of garbage collection, and the "in use" mark that protects blobs a push is about to reference.

The database is the arbiter: a blob row is deleted only by one statement that re-checks, at that moment,
that no version file references it and that nobody marked it in use within the grace period; the
foreign key from ``version_files`` to ``blobs`` refuses a commit that references a row deleted meanwhile
(and refuses the delete of a row a commit referenced meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.registry.models import Blob, VersionFile, utcnow

# Rows per statement when digests are passed in bulk (well below every database's parameter limit).
BATCH = 500

_REFERENCED = exists().where(VersionFile.blob_digest == Blob.digest)


def mark_in_use(session: Session, digests: Iterable[str]) -> dict[str, int]:
    """Mark recorded blobs as in use now, and return the size of each one that is recorded.

    Use this as the "is it present?" check of an upload plan: a blob whose row garbage collection is
    deleting right now is not returned (the UPDATE waits for that transaction and then finds no row), and
    a blob marked here is kept for a full grace period.
    """
    wanted = sorted(set(digests))
    found: dict[str, int] = {}
    now = utcnow()
    for start in range(0, len(wanted), BATCH):
        # Rows locked in digest order, so two plans marking overlapping sets cannot deadlock; FOR NO KEY
        # UPDATE (what the UPDATE takes anyway) does not wait for version commits, whose foreign-key
        # checks hold KEY SHARE locks on the same rows. SQLite serializes writers and has no row locks.
        in_order = (
            select(Blob.digest)
            .where(Blob.digest.in_(wanted[start : start + BATCH]))
            .order_by(Blob.digest)
            .with_for_update(key_share=True)
        )
        statement = (
            update(Blob)
            .where(Blob.digest.in_(in_order))
            .values(last_used_at=now)
            .returning(Blob.digest, Blob.size)
            .execution_options(synchronize_session=False)
        )
        found.update((digest, size) for digest, size in session.execute(statement))
    return found


class GcRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def unreferenced(self, cutoff: datetime, *, after: str, limit: int) -> list[tuple[str, int]]:
        """Blobs no version references and nobody used since ``cutoff``, by digest after ``after``."""
        statement = (
            select(Blob.digest, Blob.size)
            .where(Blob.last_used_at < cutoff, ~_REFERENCED, Blob.digest > after)
            .order_by(Blob.digest)
            .limit(limit)
        )
        return [(digest, size) for digest, size in self.session.execute(statement)]

    def delete_unreferenced(self, digest: str, cutoff: datetime) -> bool:
        """Delete the blob's row if it is still unreferenced and unused since ``cutoff``; True if it was.

        Raises IntegrityError (PostgreSQL) when a version referencing it committed meanwhile.
        """
        statement = (
            delete(Blob)
            .where(Blob.digest == digest, Blob.last_used_at < cutoff, ~_REFERENCED)
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], self.session.execute(statement))
        return result.rowcount == 1

    def recorded(self, digests: list[str]) -> set[str]:
        """Which of ``digests`` have a row."""
        found: set[str] = set()
        for start in range(0, len(digests), BATCH):
            statement = select(Blob.digest).where(Blob.digest.in_(digests[start : start + BATCH]))
            found.update(self.session.scalars(statement))
        return found

    def claim(self, digest: str, size: int) -> bool:
        """Insert a placeholder row for an unrecorded digest; False if a row exists (now).

        While the claiming transaction is open, an upload recording the same digest waits for it, so a
        store object can be deleted without a concurrent upload recording it in between. The caller
        rolls the transaction back: the placeholder never becomes visible.
        """
        now = utcnow()
        statement = insert(Blob).values(digest=digest, size=size, created_at=now, last_used_at=now)
        try:
            with self.session.begin_nested():
                self.session.execute(statement)
        except IntegrityError:
            return False
        return True
