"""Result fingerprints: ``PUT/GET /api/v1/repos/{ns}/{name}/versions/{n}/results[/{dtype}]``.

A result is recorded once per base dtype and never changes: the same fingerprint again is idempotent, a
different one is 409; every refusal records nothing and leaves one ``result.record.refused`` entry.
"""

from __future__ import annotations

from typing import Any

import pytest
from _support.database import sql, yank_in_database

pytestmark = pytest.mark.backends("fs")  # SQLite and PostgreSQL

REPO = "acme/merged"
RESULT = "tmv1:" + "12" * 32
OTHER = "tmv1:" + "34" * 32


@pytest.fixture
def pushed(registry: Any) -> dict[str, Any]:
    return registry.push(REPO, registry.lora_files(0))


def record(registry: Any, dtype: str, fingerprint: Any, *, number: int = 1, by: str = "alice") -> Any:
    path = f"/api/v1/repos/{REPO}/versions/{number}/results/{dtype}"
    return registry.client.put(path, json={"fingerprint": fingerprint}, headers=registry.act_as(by))


def listed(registry: Any, number: int = 1) -> list[dict[str, Any]]:
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/{number}/results")
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def audit(registry: Any) -> list[dict[str, Any]]:
    response = registry.client.get("/api/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def stored(registry: Any) -> list[tuple[Any, ...]]:
    return sql(registry.settings, "SELECT version_id, base_dtype, fingerprint, actor FROM expected_results")


def assert_refused(registry: Any, before: list[dict[str, Any]], error: str) -> dict[str, Any]:
    """Exactly one new audit entry, a ``result.record.refused`` one with ``error``; returned."""
    after = audit(registry)
    assert len(after) == len(before) + 1
    refused = after[0]
    assert (refused["action"], refused["actor"], refused["repo"]) == ("result.record.refused", "alice", REPO)
    assert refused["details"]["error"] == error
    return refused


def test_a_result_is_recorded_listed_and_audited(registry, pushed):
    before = audit(registry)
    response = record(registry, "BF16", RESULT)
    assert response.status_code == 201, response.text
    body = response.json()
    assert {k: v for k, v in body.items() if k != "created_at"} == {
        "repo": REPO,
        "number": 1,
        "digest": pushed["digest"],
        "base_dtype": "BF16",
        "fingerprint": RESULT,
        "actor": "alice",
        "created": True,
    }
    assert record(registry, "F32", OTHER).status_code == 201
    assert record(registry, "F16", OTHER).status_code == 201
    assert [(r["base_dtype"], r["fingerprint"], r["actor"]) for r in listed(registry)] == [
        ("BF16", RESULT, "alice"),
        ("F16", OTHER, "alice"),
        ("F32", OTHER, "alice"),
    ]
    entries = audit(registry)[: len(audit(registry)) - len(before)]
    assert [e["action"] for e in entries] == ["result.record"] * 3
    assert (entries[2]["target"], entries[2]["repo"], entries[2]["actor"]) == (f"{REPO}:1", REPO, "alice")
    assert entries[2]["details"] == {
        "version": 1,
        "digest": pushed["digest"],
        "dtype": "BF16",
        "fingerprint": RESULT,
    }
    assert registry.client.get("/api/v1/audit/verify").json()["ok"] is True


def test_a_version_without_results_lists_none(registry, pushed):
    assert listed(registry) == []


def test_recording_the_same_fingerprint_again_is_idempotent(registry, pushed):
    first = record(registry, "F16", RESULT).json()
    before = audit(registry)
    again = record(registry, "F16", RESULT, by="bob")
    assert again.status_code == 200, again.text
    assert again.json() == {**first, "created": False}  # the first record, first actor included
    assert audit(registry) == before
    assert len(stored(registry)) == 1


def test_a_different_fingerprint_for_a_recorded_dtype_is_409_and_changes_nothing(registry, pushed):
    assert record(registry, "BF16", RESULT).status_code == 201
    rows, before = stored(registry), audit(registry)
    response = record(registry, "BF16", OTHER)
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "conflict"
    assert RESULT in body["detail"] and OTHER in body["detail"] and "immutable" in body["detail"]
    assert stored(registry) == rows
    assert [r["fingerprint"] for r in listed(registry)] == [RESULT]
    refused = assert_refused(registry, before, "conflict")
    assert refused["details"]["dtype"] == "BF16"
    assert refused["details"]["fingerprint"] == OTHER
    assert registry.client.get("/api/v1/audit/verify").json()["ok"] is True


def test_an_unknown_dtype_is_400_naming_the_known_ones(registry, pushed):
    before = audit(registry)
    response = record(registry, "INT8", RESULT)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert "'INT8'" in response.json()["detail"]
    assert "BF16, F16, F32, F64" in response.json()["detail"]
    assert stored(registry) == []
    assert assert_refused(registry, before, "invalid_input")["details"]["dtype"] == "INT8"


@pytest.mark.parametrize(
    "fingerprint",
    ["tmv1:" + "AB" * 32, "tmv1:" + "ab" * 31, "sha256:" + "ab" * 32, "", 12, None],
)
def test_a_malformed_fingerprint_is_400(registry, pushed, fingerprint):
    before = audit(registry)
    response = record(registry, "F32", fingerprint)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert "fingerprint" in response.json()["detail"]
    assert stored(registry) == []
    assert_refused(registry, before, "invalid_input")


@pytest.mark.parametrize("body", [b"{not json", b'{"fingerprint": "tmv1:x", "extra": 1}', b"[]"])
def test_a_bad_body_is_400(registry, pushed, body):
    before = audit(registry)
    path = f"/api/v1/repos/{REPO}/versions/1/results/F32"
    headers = {**registry.act_as("alice"), "content-type": "application/json"}
    response = registry.client.put(path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert stored(registry) == []
    assert_refused(registry, before, "invalid_input")


def test_an_unknown_version_is_404_and_audited(registry, pushed):
    before = audit(registry)
    response = record(registry, "F32", RESULT, number=9)
    assert response.status_code == 404, response.text
    assert response.json() == {"error": "version_not_found", "detail": f"{REPO} has no version 9"}
    assert registry.client.get(f"/api/v1/repos/{REPO}/versions/9/results").status_code == 404
    assert stored(registry) == []
    assert assert_refused(registry, before, "version_not_found")["target"] == f"{REPO}:9"


def test_an_unknown_repo_is_404(registry, pushed):
    response = registry.client.put(
        "/api/v1/repos/acme/nowhere/versions/1/results/F32",
        json={"fingerprint": RESULT},
        headers=registry.act_as("alice"),
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "repo_not_found"
    assert audit(registry)[0]["action"] == "result.record.refused"


def test_a_yanked_version_takes_results_as_it_takes_evals(registry, pushed):
    yank_in_database(registry.settings, REPO, 1, "leaks PII")
    response = record(registry, "F16", RESULT)
    assert response.status_code == 201, response.text
    assert [r["fingerprint"] for r in listed(registry)] == [RESULT]
    assert audit(registry)[0]["action"] == "result.record"


def test_a_control_character_in_the_dtype_is_400_and_audited_escaped(registry, pushed):
    before = audit(registry)
    response = record(registry, "F%00%0A", RESULT)
    assert response.status_code == 400, response.text
    assert "unknown base dtype 'F\\x00\\n'" in response.json()["detail"]
    assert assert_refused(registry, before, "invalid_input")["details"]["dtype"] == "F\x00\n"
    assert registry.client.get("/api/v1/audit/verify").json()["ok"] is True
