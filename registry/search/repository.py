"""All SQL of search: the filters become one query on indexed columns; the database does the filtering."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session, aliased

from deltareg.registry.models import Alias, Eval, Repo, Version, VersionFile
from deltareg.registry.search.schemas import Condition, SearchFilters

# A page row: the version, its repo, and the total size of its files.
Hit = tuple[Version, Repo, int]

_TOTAL_SIZE = (
    select(func.coalesce(func.sum(VersionFile.size), 0))
    .where(VersionFile.version_id == Version.id)
    .correlate(Version)
    .scalar_subquery()
)

_COMPARE: dict[str, Callable[[Any, float], ColumnElement[bool]]] = {
    ">=": lambda column, value: column >= value,
    "<=": lambda column, value: column <= value,
    "=": lambda column, value: column == value,
    ">": lambda column, value: column > value,
    "<": lambda column, value: column < value,
}


class SearchRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, filters: SearchFilters) -> list[Hit]:
        """Versions matching every filter, newest first (by id), at most ``filters.limit`` + 1 of them
        (the extra one tells the caller that there is a next page)."""
        statement = (
            select(Version, Repo, _TOTAL_SIZE)
            .join(Repo, Repo.id == Version.repo_id)
            .order_by(Version.id.desc())
            .limit(filters.limit + 1)
        )
        if filters.repo is not None:
            statement = statement.where(
                Repo.namespace == filters.repo.namespace, Repo.name == filters.repo.name
            )
        if filters.namespace is not None:
            statement = statement.where(Repo.namespace == filters.namespace)
        if filters.base is not None:
            # ix_versions_base_fingerprint
            statement = statement.where(Version.base_fingerprint == filters.base)
        if not filters.include_yanked:
            statement = statement.where(Version.yanked_at.is_(None))
        if filters.before_id is not None:
            statement = statement.where(Version.id < filters.before_id)
        if filters.dataset is not None:
            on_dataset = exists().where(Eval.version_id == Version.id, Eval.dataset == filters.dataset)
            statement = statement.where(on_dataset)  # ix_evals_version_id
        if filters.alias is not None:
            # ix_aliases_version_id; the alias table holds one row per alias.
            statement = statement.where(
                Version.id.in_(select(Alias.version_id).where(Alias.name == filters.alias))
            )
        for condition in filters.where:
            statement = statement.where(Version.id.in_(_newest_satisfies(condition, filters.dataset)))
        return [(version, repo, size) for version, repo, size in self.session.execute(statement)]

    def evals_of(self, version_ids: list[int]) -> list[Eval]:
        """The scores of these versions, by metric name and then oldest first."""
        if not version_ids:
            return []
        statement = select(Eval).where(Eval.version_id.in_(version_ids)).order_by(Eval.name, Eval.id)
        return list(self.session.scalars(statement))


def _newest_satisfies(condition: Condition, dataset: str | None) -> Any:
    """Ids of versions whose newest score of the metric (on ``dataset``, if given) satisfies the condition.

    A range scan on ix_evals_name_value finds the scores that satisfy it; each one counts only if no newer
    score of the same metric (on the same dataset, if scoped) exists for its version (ix_evals_version_id).
    "Newer" is the higher id: the score recorded later.
    """
    score, newer = aliased(Eval), aliased(Eval)
    superseded = [newer.version_id == score.version_id, newer.name == score.name, newer.id > score.id]
    satisfied = [score.name == condition.metric, _COMPARE[condition.op](score.value, condition.value)]
    if dataset is not None:
        superseded.append(newer.dataset == dataset)
        satisfied.append(score.dataset == dataset)
    return select(score.version_id).where(*satisfied, ~exists().where(*superseded))
