"""Aliases: compare-and-swap moves through the API, the move history, and resolving ``repo@alias``."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from deltareg.registry.db import make_engine

# Aliases live in the database alone: both databases, one store.
pytestmark = pytest.mark.backends("sqlite-fs", "postgres-fs")

REPO = "acme/bot"


def alias_moves(settings: Any) -> list[tuple[Any, ...]]:
    """Every alias_moves row (alias, from number, to number, kind, reason), oldest first."""
    engine = make_engine(settings.database_url)
    query = text(
        "SELECT m.alias, f.number, t.number, m.kind, m.reason FROM alias_moves m "
        "LEFT JOIN versions f ON f.id = m.from_version_id JOIN versions t ON t.id = m.to_version_id "
        "ORDER BY m.id"
    )
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]
    finally:
        engine.dispose()


@pytest.fixture
def three_versions(registry: Any) -> list[dict[str, Any]]:
    return [registry.push(REPO, registry.lora_files(seed)) for seed in range(3)]


def move(registry: Any, alias: str, version: int, expected: int | None, **extra: Any) -> Any:
    body = {"version": version, "expected": expected, **extra}
    return registry.client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body)


def resolve(registry: Any, ref: str) -> Any:
    return registry.client.get("/api/v1/resolve", params={"ref": ref})


def test_create_move_and_resolve(registry, three_versions):
    created = move(registry, "production", 1, None, reason="first release")
    assert created.status_code == 200, created.text
    assert created.json() | {"updated_at": None} == {
        "repo": REPO,
        "name": "production",
        "version": 1,
        "digest": three_versions[0]["digest"],
        "previous": None,
        "moved": True,
        "updated_at": None,
    }
    assert resolve(registry, f"{REPO}@production").json()["number"] == 1

    moved = move(registry, "production", 3, 1)
    assert moved.status_code == 200, moved.text
    assert (moved.json()["previous"], moved.json()["version"]) == (1, 3)
    found = resolve(registry, f"{REPO}@production").json()
    assert (found["number"], found["digest"]) == (3, three_versions[2]["digest"])

    assert alias_moves(registry.settings) == [
        ("production", None, 1, "promote", "first release"),
        ("production", 1, 3, "promote", None),
    ]


def test_a_stale_expectation_is_a_conflict_naming_the_holder_and_changes_nothing(registry, three_versions):
    assert move(registry, "production", 3, None).status_code == 200
    stale = move(registry, "production", 2, 1)
    assert stale.status_code == 409
    assert stale.json()["error"] == "conflict"
    assert "alias production of acme/bot points to 3, not 1 as expected" in stale.json()["detail"]
    assert resolve(registry, f"{REPO}@production").json()["number"] == 3
    assert len(alias_moves(registry.settings)) == 1


def test_creating_an_existing_alias_is_a_conflict(registry, three_versions):
    assert move(registry, "staging", 2, None).status_code == 200
    again = move(registry, "staging", 3, None)
    assert again.status_code == 409
    assert "already points to 2" in again.json()["detail"]
    assert resolve(registry, f"{REPO}@staging").json()["number"] == 2


def test_expecting_a_holder_of_an_undefined_alias_is_a_conflict(registry, three_versions):
    response = move(registry, "production", 2, 1)
    assert response.status_code == 409
    assert "does not exist" in response.json()["detail"]
    assert registry.client.get(f"/api/v1/repos/{REPO}/aliases").json()["aliases"] == []
    assert alias_moves(registry.settings) == []


def test_moving_to_the_current_holder_changes_nothing(registry, three_versions):
    assert move(registry, "production", 2, None).status_code == 200
    same = move(registry, "production", 2, 2)
    assert same.status_code == 200
    assert same.json()["moved"] is False
    assert len(alias_moves(registry.settings)) == 1


def test_list_and_get_aliases(registry, three_versions):
    move(registry, "staging", 3, None)
    move(registry, "production", 1, None)
    listed = registry.client.get(f"/api/v1/repos/{REPO}/aliases").json()
    assert listed["repo"] == REPO
    assert [(a["name"], a["version"]) for a in listed["aliases"]] == [("production", 1), ("staging", 3)]
    one = registry.client.get(f"/api/v1/repos/{REPO}/aliases/staging")
    assert (one.status_code, one.json()["version"]) == (200, 3)
    missing = registry.client.get(f"/api/v1/repos/{REPO}/aliases/canary")
    assert (missing.status_code, missing.json()["error"]) == (404, "alias_not_found")


def test_resolving_an_undefined_alias_is_alias_not_found(registry, three_versions):
    response = resolve(registry, f"{REPO}@production")
    assert (response.status_code, response.json()["error"]) == (404, "alias_not_found")


@pytest.mark.parametrize(
    ("alias", "body", "status", "code"),
    [
        ("production", {"version": 9, "expected": None}, 404, "version_not_found"),
        ("Production", {"version": 1, "expected": None}, 400, "invalid_name"),
        ("production", {"version": 1}, 400, "invalid_input"),  # expected must be stated
        ("production", {"version": 0, "expected": None}, 400, "invalid_input"),
        ("production", {"version": 1, "expected": None, "force": True}, 400, "invalid_input"),
        ("production", {"version": 1, "expected": None, "reason": "x" * 1001}, 400, "invalid_input"),
    ],
)
def test_bad_moves_are_refused_and_change_nothing(registry, three_versions, alias, body, status, code):
    response = registry.client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body)
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert alias_moves(registry.settings) == []


def test_aliases_of_an_unknown_repo(registry):
    response = registry.client.put(
        "/api/v1/repos/acme/none/aliases/production", json={"version": 1, "expected": None}
    )
    assert (response.status_code, response.json()["error"]) == (404, "repo_not_found")
    listed = registry.client.get("/api/v1/repos/acme/none/aliases")
    assert (listed.status_code, listed.json()["error"]) == (404, "repo_not_found")


def test_an_alias_belongs_to_its_repo(registry, three_versions):
    registry.push("acme/other", registry.lora_files(7))
    move(registry, "production", 2, None)
    response = resolve(registry, "acme/other@production")
    assert (response.status_code, response.json()["error"]) == (404, "alias_not_found")
