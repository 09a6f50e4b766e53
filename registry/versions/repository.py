from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.client.errors import RepoNotFound, VersionNotFound
from deltareg.client.refs import RepoName
from deltareg.registry.models import Repo, Version, VersionFile, utcnow

# A version together with the total size of its files.
SizedVersion = tuple[Version, int]

_TOTAL_SIZE = (
    select(func.coalesce(func.sum(VersionFile.size), 0))
    .where(VersionFile.version_id == Version.id)
    .correlate(Version)
    .scalar_subquery()
)


class RepoRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, namespace: str, name: str) -> Repo | None:
        return self.session.scalar(select(Repo).where(Repo.namespace == namespace, Repo.name == name))

    def require(self, namespace: str, name: str) -> Repo:
        """The repo ``namespace/name`` (validated here: the parts come from the URL path).

        Raises:
            InvalidName: a part is not a valid name.
            RepoNotFound: no such repo.
        """
        repo_name = RepoName.parse(f"{namespace}/{name}")
        repo = self.get(repo_name.namespace, repo_name.name)
        if repo is None:
            raise RepoNotFound(f"repository {repo_name} does not exist")
        return repo

    def get_or_create(self, namespace: str, name: str) -> Repo:
        """The repo, created on first push; two first pushes racing both end up with the same row."""
        existing = self.get(namespace, name)
        if existing is not None:
            return existing
        try:
            with self.session.begin_nested():
                repo = Repo(namespace=namespace, name=name)
                self.session.add(repo)
            return repo
        except IntegrityError:
            winner = self.get(namespace, name)
            if winner is None:
                raise
            return winner

    def lock(self, repo_id: int) -> None:
        """Serialize writers on this repo until the transaction ends (row lock; SQLite locks the file)."""
        self.session.execute(select(Repo.id).where(Repo.id == repo_id).with_for_update())

    def allocate_version_number(self, repo_id: int) -> int:
        """The next version number, taken atomically so that it is never handed out twice."""
        statement = (
            update(Repo)
            .where(Repo.id == repo_id)
            .values(last_version=Repo.last_version + 1)
            .returning(Repo.last_version)
        )
        number: int = self.session.execute(statement).scalar_one()
        return number

    def list_with_counts(self, namespace: str | None) -> list[tuple[Repo, int, int | None]]:
        """Every repo (of ``namespace``, if given) with its version count and latest number, by name.

        Both are the repo's ``last_version``, so no version row is read (a count over the versions table
        scanned every version of every repo on each listing): versions are never deleted, and a number is
        taken in the pushing transaction, so a push that fails gives its number back.
        """
        statement = select(Repo).order_by(Repo.namespace, Repo.name)
        if namespace is not None:
            statement = statement.where(Repo.namespace == namespace)
        repos = self.session.scalars(statement)
        return [(repo, repo.last_version, repo.last_version or None) for repo in repos]


class VersionRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _one(self, statement: Select[Version, int]) -> SizedVersion | None:
        row = self.session.execute(statement).first()
        return None if row is None else (row[0], row[1])

    def _sized(self) -> Select[Version, int]:
        return select(Version, _TOTAL_SIZE)

    def by_number(self, repo_id: int, number: int) -> SizedVersion | None:
        return self._one(self._sized().where(Version.repo_id == repo_id, Version.number == number))

    def require_number(self, repo: Repo, number: int) -> Version:
        """Version ``number`` of ``repo``; VersionNotFound naming both when there is none."""
        found = self.by_number(repo.id, number)
        if found is None:
            raise VersionNotFound(f"{repo.full_name} has no version {number}")
        return found[0]

    def by_digest(self, repo_id: int, digest: str) -> SizedVersion | None:
        return self._one(self._sized().where(Version.repo_id == repo_id, Version.digest == digest))

    def latest(self, repo_id: int) -> SizedVersion | None:
        return self._one(
            self._sized().where(Version.repo_id == repo_id).order_by(Version.number.desc()).limit(1)
        )

    def latest_not_yanked(self, repo_id: int) -> SizedVersion | None:
        return self._one(
            self._sized()
            .where(Version.repo_id == repo_id, Version.yanked_at.is_(None))
            .order_by(Version.number.desc())
            .limit(1)
        )

    def lock_shared(self, version_id: int) -> Version:
        """The version as committed now, share-locked until the transaction ends (PostgreSQL).

        A move locks its target before checking that it is not yanked; a yank updates the row first. So
        a yank and a move of an alias to the same version take turns: whichever comes second sees the
        other (SQLite serializes writers anyway).
        """
        statement = (
            select(Version)
            .where(Version.id == version_id)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(statement).one()

    def mark_yanked(self, version_id: int, *, reason: str, actor: str) -> bool:
        """Yank the version unless it already is; True if this call yanked it (the row stays locked)."""
        statement = (
            update(Version)
            .where(Version.id == version_id, Version.yanked_at.is_(None))
            .values(yanked_at=utcnow(), yank_reason=reason, yanked_by=actor)
            .execution_options(synchronize_session=False)
        )
        return cast(CursorResult[Any], self.session.execute(statement)).rowcount == 1

    def newest_first(self, repo_id: int) -> list[SizedVersion]:
        statement = self._sized().where(Version.repo_id == repo_id).order_by(Version.number.desc())
        return [(version, size) for version, size in self.session.execute(statement)]

    def find_in_any_repo(self, digest: str) -> Version | None:
        """A version with this manifest digest in any repo (the same manifest may live in several)."""
        return self.session.scalars(select(Version).where(Version.digest == digest).limit(1)).first()

    def add(self, version: Version, files: list[VersionFile]) -> None:
        self.session.add(version)
        self.session.flush()  # assigns version.id
        for file in files:
            file.version_id = version.id
        self.session.add_all(files)
        self.session.flush()
