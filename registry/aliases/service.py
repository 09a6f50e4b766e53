"""Alias rules: compare-and-swap moves (promotions judged by the alias's policy, rollbacks) recorded in
the alias history, and listing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from deltareg.client.errors import (
    AliasNotFound,
    Conflict,
    InvalidInput,
    VersionYanked,
)
from deltareg.client.refs import validate_alias
from deltareg.registry.aliases.repository import AliasRepository, AliasTarget
from deltareg.registry.aliases.schemas import (
    AliasList,
    AliasMoved,
    AliasOut,
    MoveAliasRequest,
    RollbackRequest,
)
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.models import Alias, AliasMove, Repo, Version
from deltareg.registry.policies.service import PolicyService
from deltareg.registry.versions.repository import RepoRepository, VersionRepository

PROMOTE = "promote"
ROLLBACK = "rollback"


@dataclass(frozen=True)
class RolledBack:
    """One rollback done in this transaction, to be audited once every move of the write is made."""

    alias: str
    source: Version
    target: Version
    reason: str | None
    skipped_yanked: list[int] = field(default_factory=list)


class AliasService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.aliases = AliasRepository(session)
        self.audit = AuditRepository(session)
        self.policies = PolicyService(session)

    def move(
        self, namespace: str, name: str, alias: str, request: MoveAliasRequest, *, actor: str
    ) -> AliasMoved:
        """Point ``alias`` at ``request.version`` if it points at ``request.expected`` now (None: undefined).

        The alias's promotion policy (if any) is judged first, against the holder the move swaps from.

        Raises:
            Conflict: the alias holds something else than expected; nothing changed.
            PolicyViolation: the policy refuses the target (every failed rule listed); nothing changed.
            VersionYanked: the target is yanked; nothing changed.
            RepoNotFound, VersionNotFound: the repo or the target version does not exist.
        """
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        target = self.versions.require_number(repo, request.version)
        if request.expected == request.version:
            return self._unchanged(repo, alias, target)
        # A stale expectation is answered as such before the policy is judged (the swap re-checks it).
        current = self.aliases.get(repo.id, alias)
        holder = None if current is None else current[1]
        if (None if holder is None else holder.number) != request.expected:
            raise self._conflict(repo, alias, request.expected)
        self._require_not_yanked(repo, target)
        # Judged against the holder the swap below moves from: if another move got in first, the swap
        # fails, so a move can never pass the policy against one holder and replace another.
        self.policies.check_promotion(repo, alias, target, holder)
        if holder is None:
            previous_id = None
            if not self.aliases.create(repo.id, alias, target.id):
                raise self._conflict(repo, alias, request.expected)
        else:
            previous_id = holder.id
            if not self.aliases.swap(repo.id, alias, holder.id, target.id):
                raise self._conflict(repo, alias, request.expected)
        self.aliases.record_move(
            repo_id=repo.id,
            alias=alias,
            from_version_id=previous_id,
            to_version_id=target.id,
            kind=PROMOTE,
            reason=request.reason,
            actor=actor,
        )
        self.audit.append(
            actor=actor,
            action=f"alias.{PROMOTE}",
            target=f"{repo.full_name}@{alias}",
            repo=repo.full_name,
            details={
                "alias": alias,
                "from": request.expected,
                "to": target.number,
                "digest": target.digest,
                "reason": request.reason,
            },
        )
        moved = self._require_alias(repo, alias)
        return AliasMoved(**_out(repo, moved).model_dump(), previous=request.expected, moved=True)

    def rollback(
        self, namespace: str, name: str, alias: str, request: RollbackRequest, *, actor: str
    ) -> AliasMoved:
        """Move ``alias`` back to its previous holder that is not yanked, or to ``request.to``.

        Compare-and-swap from the holder read in this transaction (or ``request.expected``): a concurrent
        move makes it fail with Conflict. Policies are not applied: a rollback returns to a version that
        held the alias already. Recorded as a ``rollback`` move and audited as ``alias.rollback``.

        Raises:
            AliasNotFound: the alias is not defined.
            Conflict: no previous holder that is not yanked; or the alias moved meanwhile.
            InvalidInput: ``to`` never held the alias (promote it instead).
            VersionYanked: ``to`` was yanked.
        """
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        _alias, holder = self._require_alias(repo, alias)
        if request.expected is not None and holder.number != request.expected:
            raise self._conflict(repo, alias, request.expected)
        done = self.roll_back(repo, alias, holder, to=request.to, reason=request.reason, actor=actor)
        self.audit_rollback(repo, done, actor=actor)
        moved = self._require_alias(repo, alias)
        return AliasMoved(**_out(repo, moved).model_dump(), previous=holder.number, moved=True)

    def roll_back(
        self, repo: Repo, alias: str, holder: Version, *, to: int | None, reason: str | None, actor: str
    ) -> RolledBack:
        """Swap ``alias`` from ``holder`` back to a former holder and record the move (not audited yet:
        the caller appends ``audit_rollback`` once all its moves are made, as the last statements)."""
        history = self.aliases.history(repo.id, alias)
        skipped: list[int] = []
        if to is None:
            target = self._previous_holder(repo, alias, holder, history, skipped)
        else:
            target = self._former_holder(repo, alias, holder, history, to)
        if not self.aliases.swap(repo.id, alias, holder.id, target.id):
            raise self._conflict(repo, alias, holder.number)
        self.aliases.record_move(
            repo_id=repo.id,
            alias=alias,
            from_version_id=holder.id,
            to_version_id=target.id,
            kind=ROLLBACK,
            reason=reason,
            actor=actor,
        )
        return RolledBack(alias=alias, source=holder, target=target, reason=reason, skipped_yanked=skipped)

    def audit_rollback(self, repo: Repo, done: RolledBack, *, actor: str, **extra: Any) -> None:
        self.audit.append(
            actor=actor,
            action=f"alias.{ROLLBACK}",
            target=f"{repo.full_name}@{done.alias}",
            repo=repo.full_name,
            details={
                "alias": done.alias,
                "from": done.source.number,
                "to": done.target.number,
                "digest": done.target.digest,
                "reason": done.reason,
                "skipped_yanked": done.skipped_yanked,
                **extra,
            },
        )

    def _previous_holder(
        self, repo: Repo, alias: str, holder: Version, history: list[AliasMove], skipped: list[int]
    ) -> Version:
        """The newest former holder that is not yanked, walking back through the promotions that
        brought the alias where it is (a rollback undoes: it never returns to a version it left)."""
        for version_id in _former_holders(history, holder.id):
            candidate = self.versions.lock_shared(version_id)
            if candidate.yanked_at is None:
                return candidate
            skipped.append(candidate.number)
        where = f"alias {alias} of {repo.full_name} (at version {holder.number})"
        if skipped:
            yanked = ", ".join(map(str, skipped))
            raise Conflict(
                f"{where} has no previous holder that is not yanked (yanked: {yanked}); "
                "nothing changed; promote a version instead"
            )
        raise Conflict(f"{where} has no previous holder to roll back to; nothing changed")

    def _former_holder(
        self, repo: Repo, alias: str, holder: Version, history: list[AliasMove], number: int
    ) -> Version:
        target = self.versions.require_number(repo, number)
        if target.id == holder.id:
            raise Conflict(f"alias {alias} of {repo.full_name} already points to {number}; nothing changed")
        if target.id not in {move.to_version_id for move in history}:
            raise InvalidInput(
                f"version {number} of {repo.full_name} never held alias {alias}: a rollback only returns "
                f"to a former holder; use promote to move {alias} to a new version"
            )
        self._require_not_yanked(repo, target)
        return target

    def _require_not_yanked(self, repo: Repo, version: Version) -> None:
        """Share-lock the version (a concurrent yank waits, or is seen) and refuse it if it is yanked."""
        locked = self.versions.lock_shared(version.id)
        if locked.yanked_at is not None:
            raise VersionYanked(
                f"version {locked.number} of {repo.full_name} is yanked ({locked.yank_reason}); "
                "an alias cannot point to a yanked version; nothing changed"
            )

    def _unchanged(self, repo: Repo, alias: str, target: Version) -> AliasMoved:
        # Asking to move an alias to where it already points: nothing to swap and nothing to record.
        current = self.aliases.get(repo.id, alias)
        if current is None or current[1].id != target.id:
            raise self._conflict(repo, alias, target.number)
        return AliasMoved(**_out(repo, current).model_dump(), previous=target.number, moved=False)

    def _conflict(self, repo: Repo, alias: str, expected: int | None) -> Conflict:
        """The stale-expectation error, naming what the alias actually holds now."""
        current = self.aliases.get(repo.id, alias)
        where = f"alias {alias} of {repo.full_name}"
        wanted = "not to exist" if expected is None else f"to point to {expected}"
        if current is None:
            return Conflict(f"{where} does not exist, but the move expected it {wanted}; nothing changed")
        holder = current[1].number
        if expected is None:
            return Conflict(
                f"{where} already points to {holder}, but the move expected it {wanted}; nothing changed "
                f"(re-read it and retry with expected={holder})"
            )
        return Conflict(
            f"{where} points to {holder}, not {expected} as expected; nothing changed "
            f"(re-read it and retry with expected={holder})"
        )

    def list(self, namespace: str, name: str) -> AliasList:
        """Every alias of the repo with the version it points to, by name."""
        repo = self.repos.require(namespace, name)
        return AliasList(repo=repo.full_name, aliases=[_out(repo, row) for row in self.aliases.list(repo.id)])

    def get(self, namespace: str, name: str, alias: str) -> AliasOut:
        """One alias and the version it points to."""
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        return _out(repo, self._require_alias(repo, alias))

    def _require_alias(self, repo: Repo, alias: str) -> AliasTarget:
        found = self.aliases.get(repo.id, alias)
        if found is None:
            raise AliasNotFound(f"alias {alias!r} is not defined on {repo.full_name}")
        return found


def _out(repo: Repo, row: tuple[Alias, Version]) -> AliasOut:
    alias, version = row
    return AliasOut(
        repo=repo.full_name,
        name=alias.name,
        version=version.number,
        digest=version.digest,
        updated_at=alias.updated_at,
    )


def _former_holders(history: list[AliasMove], current_id: int) -> list[int]:
    """Version ids to roll back to, most recent first, from the alias history (oldest move first).

    The history is replayed as a stack of holders: a promotion pushes its target, a rollback pops back
    down to the version it returned to. So repeated rollbacks keep going back (3 -> 2 -> 1) instead of
    bouncing between the last two versions.
    """
    stack: list[int] = []
    for move in history:
        if move.kind == ROLLBACK and move.to_version_id in stack:
            while stack[-1] != move.to_version_id:
                stack.pop()
        else:
            stack.append(move.to_version_id)
    found = [version_id for version_id in reversed(stack) if version_id != current_id]
    return list(dict.fromkeys(found))
