"""Search rules: validating filters and shaping the answer; the filtering itself is SQL (repository)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.errors import InvalidInput
from deltareg.client.fingerprint import is_fingerprint
from deltareg.client.refs import RepoName, validate_alias, validate_name_part
from deltareg.registry.evals.schemas import EvalOut, eval_out
from deltareg.registry.models import Eval
from deltareg.registry.search.repository import SearchRepository
from deltareg.registry.search.schemas import (
    MAX_CONDITIONS,
    Condition,
    SearchFilters,
    VersionHit,
    VersionSearch,
)
from deltareg.registry.versions.service import _summary as version_summary


class SearchService:
    def __init__(self, session: Session) -> None:
        self.search_rows = SearchRepository(session)

    def search(
        self,
        *,
        repo: str | None = None,
        namespace: str | None = None,
        base: str | None = None,
        where: list[str] | None = None,
        dataset: str | None = None,
        alias: str | None = None,
        include_yanked: bool = False,
        limit: int,
        cursor: str | None = None,
    ) -> VersionSearch:
        """Versions matching every filter given, newest first, one page of at most ``limit``."""
        return self.find(
            SearchFilters(
                repo=RepoName.parse(repo) if repo is not None else None,
                namespace=validate_name_part(namespace, "namespace") if namespace is not None else None,
                base=_fingerprint(base) if base is not None else None,
                where=_conditions(where or []),
                dataset=dataset,
                alias=validate_alias(alias) if alias is not None else None,
                include_yanked=include_yanked,
                limit=limit,
                before_id=_cursor(cursor) if cursor is not None else None,
            )
        )

    def find(self, filters: SearchFilters) -> VersionSearch:
        rows = self.search_rows.find(filters)
        page, more = rows[: filters.limit], len(rows) > filters.limit
        evals: dict[int, list[Eval]] = {}
        for row in self.search_rows.evals_of([version.id for version, _, _ in page]):
            evals.setdefault(row.version_id, []).append(row)
        hits = [
            VersionHit(
                **version_summary(repo, (version, size)).model_dump(),
                evals=[eval_out(e) for e in evals.get(version.id, [])],
                matched=_matched(evals.get(version.id, []), filters),
            )
            for version, repo, size in page
        ]
        next_cursor = str(page[-1][0].id) if more and page else None
        return VersionSearch(versions=hits, next_cursor=next_cursor)


def _matched(rows: list[Eval], filters: SearchFilters) -> list[EvalOut]:
    """For each condition, the score that satisfied it: the metric's newest (on the dataset, if scoped)."""
    matched = []
    for condition in filters.where:
        scores = [
            e
            for e in rows
            if e.name == condition.metric and (filters.dataset is None or e.dataset == filters.dataset)
        ]
        if scores:
            matched.append(eval_out(max(scores, key=lambda e: e.id)))
    return matched


def _conditions(texts: list[str]) -> tuple[Condition, ...]:
    if len(texts) > MAX_CONDITIONS:
        raise InvalidInput(f"too many where conditions ({len(texts)}); at most {MAX_CONDITIONS}")
    return tuple(Condition.parse(text) for text in texts)


def _fingerprint(text: str) -> str:
    if not is_fingerprint(text):
        raise InvalidInput(
            f"invalid base {text!r}: expected a fingerprint 'tmv1:' followed by 64 lower-case hex digits"
        )
    return text


MAX_CURSOR = 2**31 - 1  # a version id (INTEGER): PostgreSQL refuses a larger one with a 500


def _cursor(text: str) -> int:
    # ASCII digits only: isdigit() also takes "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not 1 <= int(text) <= MAX_CURSOR:
        raise InvalidInput(f"invalid cursor {text!r}: pass the next_cursor of the previous page unchanged")
    return int(text)
