from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.registry.gc.repository import mark_in_use
from deltareg.registry.models import Blob


class BlobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, digest: str) -> Blob | None:
        return self.session.get(Blob, digest)

    def get_many(self, digests: Iterable[str]) -> dict[str, Blob]:
        wanted = set(digests)
        if not wanted:
            return {}
        rows = self.session.scalars(select(Blob).where(Blob.digest.in_(wanted)))
        return {row.digest: row for row in rows}

    def mark_in_use(self, digests: Iterable[str]) -> dict[str, int]:
        """Mark the recorded blobs among ``digests`` as used now; returns their recorded sizes.

        The rows stay locked (PostgreSQL) until the transaction ends, so garbage collection cannot delete
        a blob between this check and the commit that references it.
        """
        return mark_in_use(self.session, digests)

    def ensure(self, digest: str, size: int) -> bool:
        """Record a verified blob (or mark it used when it is recorded); True if this call recorded it."""
        if self.mark_in_use([digest]):
            return False
        try:
            with self.session.begin_nested():
                self.session.add(Blob(digest=digest, size=size))
        except IntegrityError:
            return False  # a concurrent upload of the same bytes recorded it first: same digest, same size
        return True
