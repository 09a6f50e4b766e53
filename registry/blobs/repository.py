from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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

    def ensure(self, digest: str, size: int) -> None:
        """Record a stored blob unless it is recorded already (also by a concurrent upload)."""
        if self.get(digest) is not None:
            return
        try:
            with self.session.begin_nested():
                self.session.add(Blob(digest=digest, size=size))
        except IntegrityError:
            pass  # a concurrent upload of the same bytes recorded it first: same digest, same size
