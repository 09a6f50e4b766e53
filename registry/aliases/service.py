"""Alias rules: compare-and-swap moves recorded in the alias history, and listing."""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.errors import AliasNotFound, Conflict, RepoNotFound, VersionNotFound
from deltareg.client.refs import RepoName, validate_alias
from deltareg.registry.aliases.repository import AliasRepository, AliasTarget
from deltareg.registry.aliases.schemas import AliasList, AliasMoved, AliasOut, MoveAliasRequest
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.models import Alias, Repo, Version
from deltareg.registry.versions.repository import RepoRepository, VersionRepository

PROMOTE = "promote"


class AliasService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.aliases = AliasRepository(session)
        self.audit = AuditRepository(session)

    def move(
        self, namespace: str, name: str, alias: str, request: MoveAliasRequest, *, actor: str
    ) -> AliasMoved:
        """Point ``alias`` at ``request.version`` if it points at ``request.expected`` now (None: undefined).

        Raises:
            Conflict: the alias holds something else than expected; nothing changed.
            RepoNotFound, VersionNotFound: the repo or the target version does not exist.
        """
        validate_alias(alias)
        repo = self._require_repo(namespace, name)
        target = self._require_version(repo, request.version)
        if request.expected is None:
            previous_id = None
            if not self.aliases.create(repo.id, alias, target.id):
                raise self._conflict(repo, alias, request.expected)
        elif request.expected == request.version:
            return self._unchanged(repo, alias, target)
        else:
            previous_id = self._swap(repo, alias, request.expected, target)
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

    def _swap(self, repo: Repo, alias: str, expected_number: int, target: Version) -> int:
        """Move the alias from version ``expected_number`` to ``target``; the id it moved from."""
        expected = self.versions.by_number(repo.id, expected_number)
        if expected is None or not self.aliases.swap(repo.id, alias, expected[0].id, target.id):
            raise self._conflict(repo, alias, expected_number)
        return expected[0].id

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
        repo = self._require_repo(namespace, name)
        return AliasList(repo=repo.full_name, aliases=[_out(repo, row) for row in self.aliases.list(repo.id)])

    def get(self, namespace: str, name: str, alias: str) -> AliasOut:
        """One alias and the version it points to."""
        validate_alias(alias)
        repo = self._require_repo(namespace, name)
        return _out(repo, self._require_alias(repo, alias))

    def _require_repo(self, namespace: str, name: str) -> Repo:
        repo_name = RepoName.parse(f"{namespace}/{name}")
        repo = self.repos.get(repo_name.namespace, repo_name.name)
        if repo is None:
            raise RepoNotFound(f"repository {repo_name} does not exist")
        return repo

    def _require_version(self, repo: Repo, number: int) -> Version:
        found = self.versions.by_number(repo.id, number)
        if found is None:
            raise VersionNotFound(f"{repo.full_name} has no version {number}")
        return found[0]

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
