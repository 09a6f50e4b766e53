"""Searching versions: ``GET /api/v1/versions`` with filters on repo, base, scores, dataset and alias.

Semantics under test: every filter given must hold; a ``where`` condition is judged on the version's
newest score of the metric (on ``dataset``, if given), so a version whose older score passes but whose
newest fails does not match; yanked versions are left out unless asked for; newest version first.
"""

from __future__ import annotations

from typing import Any

import pytest
from _support.database import yank_in_database
from sqlalchemy import event
from sqlalchemy.orm import Session

from deltareg.registry.db import make_engine
from deltareg.registry.search.repository import SearchRepository
from deltareg.registry.search.schemas import Condition, SearchFilters

pytestmark = pytest.mark.backends("fs")

BASE_A = "tmv1:" + "ab" * 32
BASE_B = "tmv1:" + "cd" * 32


def score(registry: Any, ref: str, *evals: tuple[str, float, str | None]) -> None:
    repo, number = ref.split(":")
    body = {"evals": [{"name": n, "value": v, "dataset": d} for n, v, d in evals]}
    response = registry.client.post(f"/api/v1/repos/{repo}/versions/{number}/evals", json=body)
    assert response.status_code == 201, response.text


def promote(registry: Any, ref: str, alias: str) -> None:
    repo, number = ref.split(":")
    body = {"version": int(number), "expected": None}
    response = registry.client.put(f"/api/v1/repos/{repo}/aliases/{alias}", json=body)
    assert response.status_code == 200, response.text


@pytest.fixture
def catalog(registry: Any, settings: Any) -> Any:
    """Five versions, pushed in this order (so newest first is the reverse):

    acme/bot:1    base A  accuracy 0.9 on d1, then accuracy 0.5 on d2, f1 0.7 on d1    @production (old)
    acme/bot:2    base A  accuracy 0.85 on d1, then 0.6 on d1 (older passes >=0.8, newest fails)
    acme/other:1  base B  accuracy 0.82 on d2                                            @staging
    beta/bot:1    base A  f1 0.5 (no dataset)                                            @production
    beta/bot:2    base A  accuracy 0.99 on d1, yanked
    """
    pushes = [
        ("acme/bot", BASE_A),
        ("acme/bot", BASE_A),
        ("acme/other", BASE_B),
        ("beta/bot", BASE_A),
        ("beta/bot", BASE_A),
    ]
    for seed, (repo, base) in enumerate(pushes):
        registry.push(repo, registry.lora_files(seed), fingerprint=base)
    score(registry, "acme/bot:1", ("accuracy", 0.9, "d1"))
    score(registry, "acme/bot:2", ("accuracy", 0.85, "d1"))
    score(registry, "acme/other:1", ("accuracy", 0.82, "d2"))
    score(registry, "beta/bot:1", ("f1", 0.5, None))
    score(registry, "beta/bot:2", ("accuracy", 0.99, "d1"))
    score(registry, "acme/bot:1", ("accuracy", 0.5, "d2"), ("f1", 0.7, "d1"))
    score(registry, "acme/bot:2", ("accuracy", 0.6, "d1"))
    promote(registry, "acme/bot:1", "production")
    promote(registry, "acme/other:1", "staging")
    promote(registry, "beta/bot:1", "production")
    # Moving acme/bot@production away from :1 leaves :1 no longer pointed at.
    moved = registry.client.put(
        "/api/v1/repos/acme/bot/aliases/production", json={"version": 2, "expected": 1}
    )
    assert moved.status_code == 200, moved.text
    yank_in_database(settings, "beta/bot", 2, "regressed on safety")
    return registry


def search(registry: Any, **params: Any) -> dict[str, Any]:
    response = registry.client.get("/api/v1/versions", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def refs(registry: Any, **params: Any) -> list[str]:
    return [f"{v['repo']}:{v['number']}" for v in search(registry, **params)["versions"]]


ALL_BUT_YANKED = ["beta/bot:1", "acme/other:1", "acme/bot:2", "acme/bot:1"]


def test_without_filters_every_version_but_yanked_ones_newest_first(catalog):
    assert refs(catalog) == ALL_BUT_YANKED
    assert refs(catalog, include_yanked=True) == ["beta/bot:2", *ALL_BUT_YANKED]


def test_hits_are_version_summaries_with_their_scores(catalog):
    (hit,) = search(catalog, repo="acme/other")["versions"]
    shown = catalog.client.get("/api/v1/repos/acme/other/versions/1").json()
    assert {k: hit[k] for k in ("repo", "number", "digest", "kind", "base_fingerprint", "size")} == {
        k: shown[k] for k in ("repo", "number", "digest", "kind", "base_fingerprint", "size")
    }
    assert [(e["name"], e["value"], e["dataset"]) for e in hit["evals"]] == [("accuracy", 0.82, "d2")]
    assert hit["yanked"] is None and hit["matched"] == []


def test_a_yanked_hit_says_why(catalog):
    (hit,) = search(catalog, repo="beta/bot", include_yanked=True, where="accuracy>=0.9")["versions"]
    assert hit["yanked"]["reason"] == "regressed on safety"
    assert refs(catalog, repo="beta/bot", where="accuracy>=0.9") == []


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"repo": "acme/bot"}, ["acme/bot:2", "acme/bot:1"]),
        ({"repo": "acme/nowhere"}, []),
        ({"namespace": "acme"}, ["acme/other:1", "acme/bot:2", "acme/bot:1"]),
        ({"namespace": "beta"}, ["beta/bot:1"]),
        ({"base": BASE_B}, ["acme/other:1"]),
        ({"base": BASE_A}, ["beta/bot:1", "acme/bot:2", "acme/bot:1"]),
        ({"dataset": "d2"}, ["acme/other:1", "acme/bot:1"]),
        ({"dataset": "d1"}, ["acme/bot:2", "acme/bot:1"]),
        ({"alias": "production"}, ["beta/bot:1", "acme/bot:2"]),
        ({"alias": "staging"}, ["acme/other:1"]),
        ({"alias": "canary"}, []),
    ],
)
def test_each_filter_alone(catalog, params, expected):
    assert refs(catalog, **params) == expected


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # acme/bot:2 scored 0.85 first, then 0.6: its newest fails, so it is not a match.
        ("accuracy>=0.8", ["acme/other:1"]),
        ("accuracy<0.7", ["acme/bot:2", "acme/bot:1"]),
        ("accuracy<=0.6", ["acme/bot:2", "acme/bot:1"]),
        ("accuracy>0.82", []),
        ("accuracy=0.82", ["acme/other:1"]),
        ("accuracy==0.5", ["acme/bot:1"]),
        (" accuracy >= 0.8 ", ["acme/other:1"]),
        ("f1>0", ["beta/bot:1", "acme/bot:1"]),
        ("loss<1", []),
    ],
)
def test_where_judges_the_newest_score_of_the_metric(catalog, where, expected):
    assert refs(catalog, where=where) == expected


def test_dataset_scopes_where_to_the_newest_score_on_that_dataset(catalog):
    # acme/bot:1's newest accuracy is 0.5 on d2, but its newest on d1 is 0.9.
    assert refs(catalog, where="accuracy>=0.8") == ["acme/other:1"]
    assert refs(catalog, where="accuracy>=0.8", dataset="d1") == ["acme/bot:1"]
    assert refs(catalog, where="accuracy>=0.8", dataset="d2") == ["acme/other:1"]
    (hit,) = search(catalog, where="accuracy>=0.8", dataset="d1")["versions"]
    assert [(e["name"], e["value"], e["dataset"]) for e in hit["matched"]] == [("accuracy", 0.9, "d1")]


def test_filters_combine_with_and(catalog):
    assert refs(catalog, base=BASE_A, where="f1>=0.6", dataset="d1") == ["acme/bot:1"]
    assert refs(catalog, where=["accuracy<0.7", "f1>0"]) == ["acme/bot:1"]
    assert refs(catalog, where=["accuracy>=0.8", "f1>=0.6"], dataset="d1") == ["acme/bot:1"]
    assert refs(catalog, where=["accuracy>=0.8", "f1>=0.8"], dataset="d1") == []
    assert refs(catalog, alias="production", namespace="acme") == ["acme/bot:2"]
    assert refs(catalog, alias="production", where="accuracy<0.7") == ["acme/bot:2"]
    assert refs(catalog, alias="staging", base=BASE_A) == []
    assert refs(catalog, repo="acme/bot", dataset="d2", where="accuracy<0.6") == ["acme/bot:1"]
    hit = search(catalog, where=["accuracy<0.7", "f1>0"])["versions"][0]
    assert [(e["name"], e["value"]) for e in hit["matched"]] == [("accuracy", 0.5), ("f1", 0.7)]


def test_pages_follow_the_cursor_without_gaps_or_repeats(catalog):
    first = search(catalog, limit=3, include_yanked=True)
    assert [f"{v['repo']}:{v['number']}" for v in first["versions"]] == ["beta/bot:2", *ALL_BUT_YANKED[:2]]
    assert first["next_cursor"]
    second = search(catalog, limit=3, include_yanked=True, cursor=first["next_cursor"])
    assert [f"{v['repo']}:{v['number']}" for v in second["versions"]] == ALL_BUT_YANKED[2:]
    assert second["next_cursor"] is None
    exact = search(catalog, limit=4)
    assert len(exact["versions"]) == 4 and exact["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"where": "accuracy>>0.8"}, "accuracy>>0.8"),
        ({"where": "accuracy"}, "'accuracy'"),
        ({"where": ">=0.8"}, ">=0.8"),
        ({"where": "accuracy>=high"}, "'high' is not a number"),
        ({"where": "accuracy>=nan"}, "not a finite number"),
        ({"where": "accuracy>=inf"}, "not a finite number"),
        ({"where": "../x>=1"}, "'../x' is not a metric name"),
        ({"where": "accuracy!=1"}, "accuracy!=1"),
        ({"where": [f"m{i}>=0" for i in range(17)]}, "too many where conditions"),
        ({"base": "tmv1:xyz"}, "invalid base 'tmv1:xyz'"),
        ({"repo": "acme"}, "'acme'"),
        ({"namespace": "Acme"}, "'Acme'"),
        ({"alias": "Prod"}, "'Prod'"),
        ({"cursor": "abc"}, "invalid cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(catalog, params, named):
    response = catalog.client.get("/api/v1/versions", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"] in ("invalid_input", "invalid_name")
    assert named in response.json()["detail"]


@pytest.mark.backends("sqlite-fs")
def test_the_database_filters_with_indexes(catalog, settings):
    """The plan, not Python, does the work: scores by their (name, value) index, versions by base."""
    engine = make_engine(settings.database_url)
    statements: list[tuple[str, Any]] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append((args[2], args[3])))
    try:
        with Session(engine) as session:
            filters = SearchFilters(base=BASE_A, where=(Condition("accuracy", ">=", 0.8),), limit=10)
            assert SearchRepository(session).find(filters) == []
            sql, params = statements[-1]
            plan = " | ".join(
                row[3] for row in session.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
            )
    finally:
        engine.dispose()
    assert "USING INDEX ix_evals_name_value" in plan, plan
    assert "USING INDEX ix_versions_base_fingerprint" in plan, plan
    assert "SCAN evals" not in plan, plan
