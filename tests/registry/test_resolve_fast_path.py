"""GET /resolve's fast path (registry/versions/fast_path.py) answers what the FastAPI route answers.

The fast path serves the plain cached case beneath FastAPI; everything else goes on to the route. These
tests hold its answers against an app whose cache is off (so every request takes the route), request by
request, over one database and store, and check that the fast path really did serve the plain ones.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests._support.auth import TEST_TOKEN, bearer, create_token

REPO = "acme/fast"
HITS = re.compile(r"^deltareg_resolve_cache_hits_total (\S+)$", re.MULTILINE)


@pytest.fixture
def fast_repo(registry: Any) -> list[dict[str, Any]]:
    versions = [registry.push(REPO, registry.lora_files(seed)) for seed in range(3)]
    alias = {"version": 1, "expected": None}
    moved = registry.client.put(f"/api/v1/repos/{REPO}/aliases/production", json=alias)
    assert moved.status_code == 200, moved.text
    yanked = registry.client.post(f"/api/v1/repos/{REPO}/versions/3/yank", json={"reason": "regressed"})
    assert yanked.status_code == 200, yanked.text
    return versions


def cache_hits(client: Any) -> float:
    found = HITS.search(client.get("/metrics").text)
    assert found is not None, "deltareg_resolve_cache_hits_total is not exposed"
    return float(found.group(1))


def answer(client: Any, query: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    response = client.get(f"/api/v1/resolve?{query}", headers=headers)
    return response.status_code, response.headers.get("content-type", ""), response.content


def test_plain_resolves_of_a_known_token_are_served_from_memory(registry, fast_repo):
    reader = create_token(registry.client, "fast-reader", ["read"], ["acme"])
    refs = [f"{REPO}@production", f"{REPO}:2", REPO, f"{REPO}@{fast_repo[0]['digest']}"]

    def resolve_all() -> list[Any]:
        headers = bearer(reader)
        return [registry.client.get("/api/v1/resolve", params={"ref": r}, headers=headers) for r in refs]

    first = resolve_all()
    before = cache_hits(registry.client)
    again = resolve_all()
    assert cache_hits(registry.client) - before == len(refs)
    assert [r.content for r in again] == [r.content for r in first]
    assert [r.json()["number"] for r in again] == [1, 2, 2, 1]
    assert {r.headers["content-type"] for r in again} == {"application/json"}


def test_every_answer_is_the_routes_answer(registry, make_registry, fast_repo):
    reader = create_token(registry.client, "acme-reader", ["read"], ["acme"])
    stranger = create_token(registry.client, "other-reader", ["read"], ["other"])
    digest = fast_repo[0]["digest"]
    cases: list[tuple[str, dict[str, str]]] = [
        (f"ref={REPO}%40production", bearer(TEST_TOKEN)),
        (f"ref={REPO}%40production", bearer(reader)),
        (f"ref={REPO}:1", bearer(reader)),
        (f"ref={REPO}", bearer(reader)),
        (f"ref={REPO}%40{digest}", bearer(reader)),
        (f"ref={REPO}%40production", bearer(stranger)),  # 403: not its namespace
        (f"ref={REPO}%40production", {"Authorization": "Basic dXNlcjpwYXNz"}),  # 401: not a bearer token
        (f"ref={REPO}%40production", bearer("drg_" + "0" * 40)),  # 401: unknown token
        (f"ref={REPO}%40production", {}),  # no token at all: whatever anonymous reads allow
        ("", bearer(reader)),  # no ref
        ("ref=", bearer(reader)),
        ("ref=" + "a" * 513, bearer(reader)),  # longer than the route allows
        (f"ref={REPO}%00", bearer(reader)),
        ("ref=not%20a%20ref", bearer(reader)),
        ("ref=acme/missing%40production", bearer(reader)),  # 404
        (f"ref={REPO}:3", bearer(reader)),  # 410: yanked
        (f"ref={REPO}:3&allow_yanked=true", bearer(reader)),
        (f"ref={REPO}:1&allow_yanked=true", bearer(reader)),
        (f"ref={REPO}:1&unknown=1", bearer(reader)),
        (f"ref={REPO}:1&ref={REPO}:2", bearer(reader)),
    ]
    with make_registry(version_cache_bytes=0) as uncached:
        for query, headers in cases:
            answer(registry.client, query, headers)  # renders and keeps what can be kept
            fast = answer(registry.client, query, headers)
            routed = answer(uncached.client, query, headers)
            assert fast == routed, (query, headers)
        assert cache_hits(uncached.client) == 0
    assert cache_hits(registry.client) >= 5  # the plain cases above were answered from memory


def test_a_fast_answer_has_the_request_id_and_is_timed_under_its_route(registry, fast_repo):
    ref = {"ref": f"{REPO}@production"}
    registry.client.get("/api/v1/resolve", params=ref)
    before = cache_hits(registry.client)
    response = registry.client.get("/api/v1/resolve", params=ref, headers={"X-Request-ID": "fast-path-1"})
    assert cache_hits(registry.client) == before + 1
    assert response.headers["X-Request-ID"] == "fast-path-1"
    exposition = registry.client.get("/metrics").text
    series = 'deltareg_http_request_duration_seconds_count{method="GET",route="/api/v1/resolve",status="200"}'
    timed = re.search(rf"^{re.escape(series)} (\S+)$", exposition, re.MULTILINE)
    assert timed is not None and float(timed.group(1)) >= 2
