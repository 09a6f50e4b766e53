"""The resolve read path, the registry's hottest request (every production pull starts with it).

One query finds what a reference names *now* (the alias is read for every request, so a promotion or a
rollback on any replica is seen by the next resolve) together with the version's mutable state.
Concurrent resolves of one reference share that query, never one that began before they arrived
(registry/coalesce.py). The version's JSON is rendered by the full service path once, kept in this
process, and served from memory while that state is unchanged.

Why the state is enough to know the rendering is current: a version's row, files and manifest never
change; what can change is its yank (set once, never cleared) and its evals (rows are only ever added). So
(id, digest, yanked, number of evals) changes whenever the rendering would. A count rather than the newest
eval id, because PostgreSQL can commit a lower id after a higher one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import LRUCache
from sqlalchemy import ColumnElement, Select, and_, bindparam, func, select
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from deltareg.client.refs import Reference
from deltareg.registry.coalesce import Coalescer
from deltareg.registry.db import Database
from deltareg.registry.models import Alias, Eval, Repo, Version
from deltareg.registry.storage import BlobStore
from deltareg.registry.versions.schemas import VersionOut
from deltareg.registry.versions.service import VersionService

_EVAL_COUNT = select(func.count()).where(Eval.version_id == Version.id).correlate(Version).scalar_subquery()


@dataclass(frozen=True)
class VersionState:
    """What a reference names now, and everything about that version that can still change."""

    version_id: int
    digest: str
    yanked: bool
    evals: int

    def matches(self, rendered: VersionOut) -> bool:
        """True if ``rendered`` shows this state (it was not rendered before or after a change)."""
        return (rendered.digest, rendered.yanked is not None, len(rendered.evals)) == (
            self.digest,
            self.yanked,
            self.evals,
        )


def _locating(*conditions: ColumnElement[bool]) -> Select[int, str, bool, int]:
    """The query from a reference to its VersionState, built once per reference form (bound values)."""
    return (
        select(Version.id, Version.digest, Version.yanked_at.is_not(None), _EVAL_COUNT)
        .join(Repo, Repo.id == Version.repo_id)
        .where(Repo.namespace == bindparam("namespace"), Repo.name == bindparam("name"), *conditions)
    )


_BY_ALIAS = _locating(Alias.name == bindparam("target")).join(
    Alias, and_(Alias.repo_id == Repo.id, Alias.version_id == Version.id)
)
_BY_NUMBER = _locating(Version.number == bindparam("target"))
_BY_DIGEST = _locating(Version.digest == bindparam("target"))
_NEWEST_NOT_YANKED = _locating(Version.yanked_at.is_(None)).order_by(Version.number.desc()).limit(1)


class VersionLocator:
    """Repository: one query from a reference to the :class:`VersionState` it names, or None."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def locate(self, ref: Reference) -> VersionState | None:
        statement, target = self._statement(ref)
        values = {"namespace": ref.repo.namespace, "name": ref.repo.name, "target": target}
        row = self.connection.execute(statement, values).first()
        return None if row is None else VersionState(row[0], row[1], bool(row[2]), row[3])

    @staticmethod
    def _statement(ref: Reference) -> tuple[Select[int, str, bool, int], str | int | None]:
        if ref.alias is not None:
            return _BY_ALIAS, ref.alias
        if ref.version is not None:
            return _BY_NUMBER, ref.version
        if ref.digest is not None:
            return _BY_DIGEST, ref.digest
        return _NEWEST_NOT_YANKED, None


class RenderedVersions:
    """Version id -> (state, JSON body), least recently used out first, at most ``max_bytes`` of bodies.

    Touched only from the event loop's thread, so it needs no lock.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: LRUCache[int, tuple[VersionState, bytes]] = LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=lambda entry: len(entry[1])
        )

    def is_empty(self) -> bool:
        return len(self._entries) == 0

    def get(self, state: VersionState) -> bytes | None:
        entry = self._entries.get(state.version_id)
        return entry[1] if entry is not None and entry[0] == state else None

    def put(self, state: VersionState, body: bytes) -> None:
        if len(body) <= self.max_bytes:  # a body larger than the whole budget is not kept
            self._entries[state.version_id] = (state, body)


class VersionReads:
    """Service: resolve a reference to the version's JSON, from memory when it is current."""

    def __init__(self, database: Database, store: BlobStore, rendered: RenderedVersions) -> None:
        self.database = database
        self.store = store
        self.rendered = rendered
        # Concurrent resolves of one reference (a fleet pulling repo@production) share their query.
        self._locates: Coalescer[Reference, VersionState | None] = Coalescer(self._locate_in_thread)

    async def resolve_json(self, ref: Reference, *, allow_yanked: bool) -> bytes:
        """The JSON of ``VersionService.resolve(ref)``, byte for byte; raises what that raises."""
        state = await self._servable_state(ref, allow_yanked=allow_yanked)
        if state is not None and (body := self.rendered.get(state)) is not None:
            return body
        # Not found, not cached or changed since: the full path renders it or raises the precise error.
        version = await run_in_threadpool(self._render, ref, allow_yanked)
        body = version.model_dump_json().encode()
        if state is not None and state.matches(version):
            self.rendered.put(state, body)
        return body

    async def cached_json(self, ref: Reference) -> bytes | None:
        """What ``resolve_json(ref, allow_yanked=False)`` answers, if that is in memory and current.

        None when it is not: the version is not found, yanked, not rendered yet or changed since. With
        nothing cached (or the cache off) that is known without a query, so the caller's fallback to
        ``resolve_json`` does not locate the version twice.
        """
        if self.rendered.is_empty():
            return None
        state = await self._servable_state(ref, allow_yanked=False)
        return None if state is None else self.rendered.get(state)

    async def _servable_state(self, ref: Reference, *, allow_yanked: bool) -> VersionState | None:
        """The state of the version ``ref`` names, or None if it is not found or is yanked and
        ``allow_yanked`` is off (the full path then raises the precise error)."""
        state = await self._locates(ref)
        if state is None or (state.yanked and not allow_yanked):
            return None
        return state

    async def _locate_in_thread(self, ref: Reference) -> VersionState | None:
        return await run_in_threadpool(self._locate, ref)

    def _locate(self, ref: Reference) -> VersionState | None:
        return self.database.single_read(lambda connection: VersionLocator(connection).locate(ref))

    def _render(self, ref: Reference, allow_yanked: bool) -> VersionOut:
        with self.database.read_sessions() as session:
            return VersionService(session, self.store).resolve(ref, allow_yanked=allow_yanked)
