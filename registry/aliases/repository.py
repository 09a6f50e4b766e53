"""All SQL of aliases and their history. Moves are compare-and-swap statements, so the database decides
the winner; every move is appended to alias_moves."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Select, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from deltareg.registry.models import Alias, AliasMove, Version, utcnow

# An alias with the version it points to.
AliasTarget = tuple[Alias, Version]
# A move with the numbers of the versions it went from (None: the alias was created) and to.
MoveRow = tuple[AliasMove, int | None, int]

_FROM = aliased(Version)
_TO = aliased(Version)


class AliasRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, repo_id: int, name: str) -> AliasTarget | None:
        """The alias and its version, as committed now (a fresh read, not the session's cache)."""
        statement = (
            select(Alias, Version)
            .join(Version, Version.id == Alias.version_id)
            .where(Alias.repo_id == repo_id, Alias.name == name)
            .execution_options(populate_existing=True)
        )
        row = self.session.execute(statement).first()
        return None if row is None else (row[0], row[1])

    def pointing_to(self, repo_id: int, version_id: int) -> list[str]:
        """The names of the repo's aliases that point to the version now, sorted."""
        statement = (
            select(Alias.name)
            .where(Alias.repo_id == repo_id, Alias.version_id == version_id)
            .order_by(Alias.name)
        )
        return list(self.session.scalars(statement))

    def history(self, repo_id: int, name: str) -> list[AliasMove]:
        """Every recorded move of the alias, oldest first."""
        statement = (
            select(AliasMove)
            .where(AliasMove.repo_id == repo_id, AliasMove.alias == name)
            .order_by(AliasMove.id)
        )
        return list(self.session.scalars(statement))

    def _moves_with_numbers(self, repo_id: int, alias: str) -> Select[AliasMove, int, int]:
        return (
            select(AliasMove, _FROM.number, _TO.number)
            .outerjoin(_FROM, _FROM.id == AliasMove.from_version_id)
            .join(_TO, _TO.id == AliasMove.to_version_id)
            .where(AliasMove.repo_id == repo_id, AliasMove.alias == alias)
        )

    def moves_newest_first(self, repo_id: int, alias: str, *, limit: int) -> list[MoveRow]:
        statement = self._moves_with_numbers(repo_id, alias).order_by(
            AliasMove.created_at.desc(), AliasMove.id.desc()
        )
        return [(move, src, dst) for move, src, dst in self.session.execute(statement.limit(limit))]

    def in_force_at(self, repo_id: int, alias: str, moment: datetime) -> MoveRow | None:
        """The newest move made at or before ``moment`` (an index range scan on repo, alias, time)."""
        statement = (
            self._moves_with_numbers(repo_id, alias)
            .where(AliasMove.created_at <= moment)
            .order_by(AliasMove.created_at.desc(), AliasMove.id.desc())
            .limit(1)
        )
        row = self.session.execute(statement).first()
        return None if row is None else (row[0], row[1], row[2])

    def list(self, repo_id: int) -> list[AliasTarget]:
        statement = (
            select(Alias, Version)
            .join(Version, Version.id == Alias.version_id)
            .where(Alias.repo_id == repo_id)
            .order_by(Alias.name)
        )
        return [(alias, version) for alias, version in self.session.execute(statement)]

    def create(self, repo_id: int, name: str, version_id: int) -> bool:
        """Define the alias; False (nothing written) when it exists, also if a concurrent move just made it.

        The primary key decides: of two replicas creating the same alias, the second INSERT waits for the
        first transaction and then fails.
        """
        statement = insert(Alias).values(
            repo_id=repo_id, name=name, version_id=version_id, updated_at=utcnow()
        )
        try:
            with self.session.begin_nested():
                self.session.execute(statement)
        except IntegrityError:
            return False
        return True

    def swap(self, repo_id: int, name: str, expected_version_id: int, new_version_id: int) -> bool:
        """Point the alias at ``new_version_id`` only if it points at ``expected_version_id``; True if it did.

        One conditional UPDATE: a concurrent move of the same alias holds the row until it commits, and
        PostgreSQL then re-checks the condition against the new row, so only one of them matches.
        """
        statement = (
            update(Alias)
            .where(Alias.repo_id == repo_id, Alias.name == name, Alias.version_id == expected_version_id)
            .values(version_id=new_version_id, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], self.session.execute(statement))
        return result.rowcount == 1

    def record_move(
        self,
        *,
        repo_id: int,
        alias: str,
        from_version_id: int | None,
        to_version_id: int,
        kind: str,
        reason: str | None,
        actor: str | None,
    ) -> AliasMove:
        """Append a move to the alias history (in the caller's transaction, with the move itself)."""
        move = AliasMove(
            repo_id=repo_id,
            alias=alias,
            from_version_id=from_version_id,
            to_version_id=to_version_id,
            kind=kind,
            reason=reason,
            actor=actor,
        )
        self.session.add(move)
        self.session.flush()
        return move
