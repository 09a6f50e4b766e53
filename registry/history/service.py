"""Alias history: every move of an alias, and where it pointed at any moment."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from deltareg.client.errors import AliasNotFound, InvalidInput
from deltareg.client.refs import validate_alias
from deltareg.registry.aliases.repository import AliasRepository, MoveRow
from deltareg.registry.history.schemas import AliasAt, AliasHistory, AliasMoveOut
from deltareg.registry.models import Repo
from deltareg.registry.versions.repository import RepoRepository


class HistoryService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.aliases = AliasRepository(session)

    def moves(self, namespace: str, name: str, alias: str, *, limit: int) -> AliasHistory:
        """The alias's moves, newest first; an alias that never existed is AliasNotFound."""
        repo = self._require_repo(namespace, name, alias)
        rows = self.aliases.moves_newest_first(repo.id, alias, limit=limit)
        if not rows:
            raise AliasNotFound(f"alias {alias!r} of {repo.full_name} has never been defined")
        return AliasHistory(repo=repo.full_name, alias=alias, moves=[_move_out(row) for row in rows])

    def at(self, namespace: str, name: str, alias: str, moment: datetime) -> AliasAt:
        """Where the alias pointed at ``moment`` (a timezone-aware time)."""
        if moment.tzinfo is None:
            raise InvalidInput("the time must carry a UTC offset (e.g. 2026-11-29T14:00:00Z)")
        try:
            moment_utc = moment.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first moment Python can hold
            raise InvalidInput(f"the time {moment.isoformat()} is out of range in UTC") from None
        repo = self._require_repo(namespace, name, alias)
        row = self.aliases.in_force_at(repo.id, alias, moment_utc)
        if row is None:
            raise AliasNotFound(f"alias {alias!r} of {repo.full_name} did not exist at {moment.isoformat()}")
        return AliasAt(repo=repo.full_name, alias=alias, at=moment, version=row[2], since=_move_out(row))

    def _require_repo(self, namespace: str, name: str, alias: str) -> Repo:
        validate_alias(alias)
        return self.repos.require(namespace, name)


def _move_out(row: MoveRow) -> AliasMoveOut:
    move, from_number, to_number = row
    return AliasMoveOut(
        kind=move.kind,
        from_version=from_number,
        to_version=to_number,
        reason=move.reason,
        actor=move.actor,
        at=move.created_at,
    )
