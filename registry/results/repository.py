from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.registry.models import ExpectedResult


class ResultRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, version_id: int, base_dtype: str, fingerprint: str, *, actor: str
    ) -> tuple[ExpectedResult, bool]:
        """Record the result; ``(the existing one, False)`` if the dtype already has one (any value).

        The unique constraint decides: of two recordings racing, the second INSERT waits for the first
        transaction and then fails, and finds the first one's row.
        """
        row = ExpectedResult(
            version_id=version_id, base_dtype=base_dtype, fingerprint=fingerprint, actor=actor
        )
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:
            existing = self.find(version_id, base_dtype)
            if existing is None:
                raise
            return existing, False
        return row, True

    def find(self, version_id: int, base_dtype: str) -> ExpectedResult | None:
        statement = select(ExpectedResult).where(
            ExpectedResult.version_id == version_id, ExpectedResult.base_dtype == base_dtype
        )
        return self.session.scalars(statement).first()

    def for_version(self, version_id: int) -> list[ExpectedResult]:
        statement = (
            select(ExpectedResult)
            .where(ExpectedResult.version_id == version_id)
            .order_by(ExpectedResult.base_dtype)
        )
        return list(self.session.scalars(statement))
