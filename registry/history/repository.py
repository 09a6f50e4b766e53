"""All SQL of the alias history: the moves of one alias, and the move in force at a time."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, aliased

from deltareg.registry.models import AliasMove, Version

# A move with the numbers of the versions it went from (None: the alias was created) and to.
MoveRow = tuple[AliasMove, int | None, int]

_FROM = aliased(Version)
_TO = aliased(Version)


class HistoryRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _moves(self, repo_id: int, alias: str) -> Select[AliasMove, int, int]:
        return (
            select(AliasMove, _FROM.number, _TO.number)
            .outerjoin(_FROM, _FROM.id == AliasMove.from_version_id)
            .join(_TO, _TO.id == AliasMove.to_version_id)
            .where(AliasMove.repo_id == repo_id, AliasMove.alias == alias)
        )

    def newest_first(self, repo_id: int, alias: str, *, limit: int) -> list[MoveRow]:
        statement = self._moves(repo_id, alias).order_by(AliasMove.created_at.desc(), AliasMove.id.desc())
        return [(move, src, dst) for move, src, dst in self.session.execute(statement.limit(limit))]

    def in_force_at(self, repo_id: int, alias: str, moment: datetime) -> MoveRow | None:
        """The newest move made at or before ``moment`` (an index range scan on repo, alias, time)."""
        statement = (
            self._moves(repo_id, alias)
            .where(AliasMove.created_at <= moment)
            .order_by(AliasMove.created_at.desc(), AliasMove.id.desc())
            .limit(1)
        )
        row = self.session.execute(statement).first()
        return None if row is None else (row[0], row[1], row[2])
