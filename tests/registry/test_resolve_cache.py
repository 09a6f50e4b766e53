"""GET /resolve serves a version's rendered JSON from memory while it is unchanged, and never a stale one.

See deltareg.registry.versions.reads: one query per request (concurrent requests share it) reads what the
reference names now and the version's mutable state (yank, number of evals); the body is rendered again
whenever that state moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event

from deltareg.client.refs import Reference
from deltareg.registry.evals.schemas import EvalOut
from deltareg.registry.versions.reads import RenderedVersions, VersionState
from deltareg.registry.versions.schemas import VersionOut, YankOut

REPO = "acme/cached"


@pytest.fixture
def two_versions(registry: Any) -> list[dict[str, Any]]:
    versions = [registry.push(REPO, registry.lora_files(seed)) for seed in range(2)]
    promote(registry, "production", 1)
    return versions


def promote(registry: Any, alias: str, number: int, *, expected: int | None = None) -> None:
    body = {"version": number, "expected": expected}
    response = registry.client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body)
    assert response.status_code == 200, response.text


def resolve(registry: Any, ref: str, **params: Any) -> Any:
    return registry.client.get("/api/v1/resolve", params={"ref": ref, **params})


@contextmanager
def selects_counted(registry: Any) -> Iterator[list[str]]:
    """The SELECT statements the app sends to its database inside the block, through either engine
    (on PostgreSQL the locating query has a pool of its own: Database.single_read; on SQLite it goes
    through the main engine, whose listeners see it)."""
    database = registry.client.app.state.database
    engines = [database.engine]
    if database.single_reads.pool is not database.engine.pool:
        engines.append(database.single_reads)
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def test_a_repeated_resolve_is_one_query_and_the_same_bytes(registry, two_versions):
    first = resolve(registry, f"{REPO}@production")
    with selects_counted(registry) as selects:
        again = resolve(registry, f"{REPO}@production")
    assert again.status_code == 200
    assert again.content == first.content
    assert len(selects) == 1, selects  # the locating query; the body came from memory
    full = registry.client.get(f"/api/v1/repos/{REPO}/versions/1")
    assert again.json() == full.json()


def test_every_reference_form_is_served_from_memory_the_second_time(registry, two_versions):
    second = two_versions[1]
    for ref in (REPO, f"{REPO}:2", f"{REPO}@{second['digest']}"):
        first = resolve(registry, ref)
        with selects_counted(registry) as selects:
            again = resolve(registry, ref)
        assert (again.content, len(selects)) == (first.content, 1), ref
        assert again.json()["number"] == 2, ref


def test_the_cached_body_is_what_an_uncached_server_renders(registry, make_registry, two_versions):
    resolve(registry, f"{REPO}@production")
    cached = resolve(registry, f"{REPO}@production")
    with make_registry(version_cache_bytes=0) as uncached:
        rendered = resolve(uncached, f"{REPO}@production")
        assert len(uncached.client.app.state.version_reads.rendered._entries) == 0
    assert cached.content == rendered.content


def test_with_the_cache_off_a_resolve_locates_the_version_once(registry, make_registry, two_versions):
    # The fast path (registry/versions/fast_path.py) has nothing to serve, so it must not query before
    # handing the request to the route, which locates the version itself.
    with make_registry(version_cache_bytes=0) as uncached:
        resolve(uncached, f"{REPO}@production")  # the token is known to this app from now on
        with selects_counted(uncached) as selects:
            assert resolve(uncached, f"{REPO}@production").json()["number"] == 1
    locating = [s for s in selects if s.lstrip().startswith("SELECT versions.id, versions.digest")]
    assert len(locating) == 1, selects


def test_concurrent_resolves_of_one_reference_share_one_query(registry, two_versions):
    # A fleet pulling repo@production at once: the requests that arrive together share the locating
    # query (registry/coalesce.py), and each still gets the current body.
    first = resolve(registry, f"{REPO}@production")
    reads = registry.client.app.state.version_reads
    ref = Reference.parse(f"{REPO}@production")

    async def sixteen_at_once() -> list[bytes | None]:
        return await asyncio.gather(*(reads.cached_json(ref) for _ in range(16)))

    with selects_counted(registry) as selects:
        bodies = asyncio.run(sixteen_at_once())
    assert bodies == [first.content] * 16
    assert len(selects) == 1, selects


def test_a_new_eval_shows_in_the_next_resolve(registry, two_versions):
    assert resolve(registry, f"{REPO}@production").json()["evals"] == []
    path = f"/api/v1/repos/{REPO}/versions/1/evals"
    recorded = registry.client.post(path, json={"evals": [{"name": "accuracy", "value": 0.75}]})
    assert recorded.status_code in (200, 201), recorded.text
    evals = resolve(registry, f"{REPO}@production").json()["evals"]
    assert [(e["name"], e["value"]) for e in evals] == [("accuracy", 0.75)]


def test_moves_and_yanks_on_another_replica_show_at_once(registry, make_registry, two_versions):
    assert resolve(registry, f"{REPO}@production").json()["number"] == 1  # rendered and kept
    assert resolve(registry, f"{REPO}:2").json()["yanked"] is None
    with make_registry() as replica:  # a second app on the same database and store
        promote(replica, "production", 2, expected=1)
        assert resolve(registry, f"{REPO}@production").json()["number"] == 2
        yank = replica.client.post(
            f"/api/v1/repos/{REPO}/versions/2/yank", json={"reason": "regressed", "rollback": True}
        )
        assert yank.status_code == 200, yank.text
    assert resolve(registry, f"{REPO}@production").json()["number"] == 1
    refused = resolve(registry, f"{REPO}:2")
    assert (refused.status_code, refused.json()["error"]) == (410, "version_yanked")
    assert "regressed" in refused.json()["detail"]
    shown = resolve(registry, f"{REPO}:2", allow_yanked="true").json()
    assert shown["yanked"]["reason"] == "regressed"
    assert resolve(registry, REPO).json()["number"] == 1  # the newest version that is not yanked


# ---------------------------------------------------------------- the pieces, on their own


def _version(digest: str = "sha256:" + "a" * 64, *, evals: int = 0, yanked: bool = False) -> VersionOut:
    now = datetime.now(UTC)
    return VersionOut(
        repo=REPO,
        number=1,
        digest=digest,
        kind="lora",
        base_fingerprint="sha256:" + "b" * 64,
        parent=None,
        created_at=now,
        size=1,
        manifest={},
        evals=[EvalOut(name=f"m{i}", value=0.5, actor=None, created_at=now) for i in range(evals)],
        yanked=YankOut(at=now, reason="bad", by=None) if yanked else None,
    )


def test_a_body_rendered_after_a_change_is_not_filed_under_the_state_before_it():
    state = VersionState(version_id=1, digest="sha256:" + "a" * 64, yanked=False, evals=1)
    assert state.matches(_version(evals=1))
    assert not state.matches(_version(evals=2))  # an eval landed between the query and the render
    assert not state.matches(_version(evals=1, yanked=True))
    assert not state.matches(_version("sha256:" + "c" * 64, evals=1))


def test_rendered_versions_are_bounded_in_bytes_least_recently_used_out_first():
    rendered = RenderedVersions(max_bytes=10)
    states = [VersionState(version_id=i, digest=f"d{i}", yanked=False, evals=0) for i in range(3)]
    rendered.put(states[0], b"0000")
    rendered.put(states[1], b"1111")
    assert rendered.get(states[0]) == b"0000"  # now the most recently used
    rendered.put(states[2], b"2222")  # 12 bytes > 10: the least recently used (1) goes
    assert (rendered.get(states[0]), rendered.get(states[1]), rendered.get(states[2])) == (
        b"0000",
        None,
        b"2222",
    )
    moved = VersionState(version_id=0, digest="d0", yanked=False, evals=1)
    assert rendered.get(moved) is None  # same version, another state: not served
    rendered.put(states[1], b"x" * 11)  # larger than the whole budget: not kept, nothing evicted
    assert rendered.get(states[1]) is None and rendered.get(states[2]) == b"2222"
