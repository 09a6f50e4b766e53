"""All SQL of the lineage graph: versions by digest, children of a set of digests, aliases of versions."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from deltareg.registry.models import Alias, Repo, Version, VersionFile

# A version, its repo and the total size of its files.
LineageRow = tuple[Version, Repo, int]

_TOTAL_SIZE = (
    select(func.coalesce(func.sum(VersionFile.size), 0))
    .where(VersionFile.version_id == Version.id)
    .correlate(Version)
    .scalar_subquery()
)


class LineageRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _rows(self) -> Select[Version, Repo, int]:
        return select(Version, Repo, _TOTAL_SIZE).join(Repo, Repo.id == Version.repo_id)

    def with_digest(self, digest: str) -> list[LineageRow]:
        """Every version with this manifest digest (one per repo at most), oldest first (index on digest)."""
        statement = self._rows().where(Version.digest == digest).order_by(Version.id)
        return [(version, repo, size) for version, repo, size in self.session.execute(statement)]

    def children_of(self, digests: Collection[str], limit: int) -> list[LineageRow]:
        """At most ``limit`` versions whose parent is one of ``digests``, oldest first: one level of the
        descendants, in one statement."""
        if not digests:
            return []
        statement = (
            self._rows().where(Version.parent_digest.in_(list(digests))).order_by(Version.id).limit(limit)
        )
        return [(version, repo, size) for version, repo, size in self.session.execute(statement)]

    def aliases_of(self, version_ids: Collection[int]) -> dict[int, list[str]]:
        """``ns/name@alias`` of every alias pointing at one of ``version_ids``, by version id, sorted."""
        if not version_ids:
            return {}
        statement = (
            select(Alias.version_id, Repo.namespace, Repo.name, Alias.name)
            .join(Repo, Repo.id == Alias.repo_id)
            .where(Alias.version_id.in_(list(version_ids)))
            .order_by(Repo.namespace, Repo.name, Alias.name)
        )
        found: dict[int, list[str]] = {}
        for version_id, namespace, name, alias in self.session.execute(statement):
            found.setdefault(version_id, []).append(f"{namespace}/{name}@{alias}")
        return found
