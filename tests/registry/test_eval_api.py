"""Scores recorded after a push: ``POST /api/v1/repos/{ns}/{name}/versions/{n}/evals``.

Every field and the actor are recorded, one audit entry per request; a bad request records nothing and
leaves exactly one ``eval.refused`` audit entry; yanked versions take scores too.
"""

from __future__ import annotations

from typing import Any

import pytest
from _support.database import yank_in_database

pytestmark = pytest.mark.backends("fs")

REPO = "acme/scored"


@pytest.fixture
def pushed(registry: Any) -> dict[str, Any]:
    return registry.push(REPO, registry.lora_files(0))


def record(registry: Any, number: int, evals: Any, *, repo: str = REPO, by: str = "alice") -> Any:
    path = f"/api/v1/repos/{repo}/versions/{number}/evals"
    return registry.client.post(path, json={"evals": evals}, headers=registry.act_as(by))


def record_raw(registry: Any, number: int, body: bytes) -> Any:
    headers = {**registry.act_as("alice"), "content-type": "application/json"}
    return registry.client.post(
        f"/api/v1/repos/{REPO}/versions/{number}/evals", content=body, headers=headers
    )


def audit(registry: Any) -> list[dict[str, Any]]:
    response = registry.client.get("/api/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def shown_evals(registry: Any, number: int) -> list[dict[str, Any]]:
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/{number}")
    assert response.status_code == 200, response.text
    evals: list[dict[str, Any]] = response.json()["evals"]
    return evals


FULL = {
    "name": "accuracy",
    "value": 0.91,
    "dataset": "tickets",
    "dataset_revision": "r3",
    "suite_version": "1.2.0",
}


def test_scores_are_recorded_with_every_field_and_the_actor(registry, pushed):
    response = record(registry, 1, [FULL, {"name": "f1", "value": 0.5}])
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["repo"], body["number"], body["digest"]) == (REPO, 1, pushed["digest"])
    recorded = [{k: v for k, v in e.items() if k != "created_at"} for e in body["evals"]]
    empty = {"dataset": None, "dataset_revision": None, "suite_version": None}
    assert recorded == [
        {**FULL, "actor": "alice"},
        {"name": "f1", "value": 0.5, **empty, "actor": "alice"},
    ]
    assert all(e["created_at"] for e in body["evals"])
    shown = shown_evals(registry, 1)
    assert [{k: v for k, v in e.items() if k != "created_at"} for e in shown] == recorded
    assert registry.count_rows()["evals"] == 2


def test_the_actor_is_the_tokens_name_whatever_a_header_declares(registry, pushed):
    path = f"/api/v1/repos/{REPO}/versions/1/evals"
    headers = {**registry.act_as("alice"), "X-Deltareg-Actor": "mallory"}
    response = registry.client.post(path, json={"evals": [{"name": "f1", "value": 0.5}]}, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["evals"][0]["actor"] == "alice"
    anonymous = registry.client.post(path, json={"evals": []}, headers={"Authorization": ""})
    assert anonymous.status_code == 401  # writes need a token


def test_later_scores_accumulate_and_are_all_kept(registry, pushed):
    assert record(registry, 1, [{"name": "accuracy", "value": 0.8}]).status_code == 201
    assert record(registry, 1, [{"name": "accuracy", "value": 0.7}]).status_code == 201
    assert [e["value"] for e in shown_evals(registry, 1)] == [0.8, 0.7]


def test_one_audit_entry_per_request_with_the_scores(registry, pushed):
    before = audit(registry)
    assert record(registry, 1, [FULL, {"name": "f1", "value": 0.5}]).status_code == 201
    after = audit(registry)
    assert len(after) == len(before) + 1
    entry = after[0]
    assert (entry["action"], entry["actor"], entry["repo"], entry["target"]) == (
        "eval",
        "alice",
        REPO,
        f"{REPO}:1",
    )
    empty = {"dataset": None, "dataset_revision": None, "suite_version": None}
    assert entry["details"] == {
        "version": 1,
        "digest": pushed["digest"],
        "evals": [FULL, {"name": "f1", "value": 0.5, **empty}],
    }
    assert registry.client.get("/api/v1/audit/verify").json()["ok"] is True


@pytest.mark.parametrize(
    ("value", "shown"),
    [(b"NaN", "NaN"), (b"Infinity", "Infinity"), (b"-Infinity", "-Infinity"), (b"1e999", "Infinity")],
)
def test_a_non_finite_value_is_refused_naming_the_metric_and_nothing_is_recorded(
    registry, pushed, value, shown
):
    before_rows, before_audit = registry.count_rows(), audit(registry)
    # A good score first: the request is refused as a whole, the good one is not recorded either.
    body = b'{"evals": [{"name": "f1", "value": 0.5}, {"name": "accuracy", "value": ' + value + b"}]}"
    response = record_raw(registry, 1, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    detail = response.json()["detail"]
    assert "'accuracy'" in detail and f"{shown} is not a finite number" in detail, detail
    assert "Input should be" not in detail
    assert registry.count_rows() == before_rows
    after = audit(registry)
    assert len(after) == len(before_audit) + 1
    refused = after[0]
    assert (refused["action"], refused["actor"], refused["target"], refused["repo"]) == (
        "eval.refused",
        "alice",
        f"{REPO}:1",
        REPO,
    )
    assert refused["details"]["error"] == "invalid_input"
    assert refused["details"]["version"] == 1
    assert "accuracy" in refused["details"]["detail"]


@pytest.mark.parametrize(
    ("evals", "words"),
    [
        ([], "evals"),
        ([{"name": f"m{i}", "value": 1.0} for i in range(65)], "evals"),
        ([{"name": "../x", "value": 1.0}], "'../x'"),
        ([{"name": "accuracy", "value": "high"}], "'accuracy'"),
        ([{"name": "accuracy", "value": 1.0, "extra": 1}], "'accuracy'"),
        ([{"name": "accuracy", "value": 1.0, "dataset": "d" * 257}], "dataset"),
        ([{"value": 1.0}], "name"),
    ],
)
def test_bad_scores_are_refused_and_audited(registry, pushed, evals, words):
    before_rows, before_audit = registry.count_rows(), audit(registry)
    response = record(registry, 1, evals)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    assert registry.count_rows() == before_rows
    after = audit(registry)
    assert [e["action"] for e in after[: len(after) - len(before_audit)]] == ["eval.refused"]


def test_a_body_that_is_not_json_is_refused(registry, pushed):
    response = record_raw(registry, 1, b"{not json")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert audit(registry)[0]["action"] == "eval.refused"


def test_an_unknown_version_is_404_naming_it_and_audited(registry, pushed):
    before_rows = registry.count_rows()
    response = record(registry, 9, [{"name": "accuracy", "value": 0.9}])
    assert response.status_code == 404, response.text
    assert response.json() == {"error": "version_not_found", "detail": f"{REPO} has no version 9"}
    assert registry.count_rows() == before_rows
    refused = audit(registry)[0]
    assert (refused["action"], refused["target"]) == ("eval.refused", f"{REPO}:9")
    assert refused["details"]["error"] == "version_not_found"


def test_an_unknown_repo_is_404_naming_it(registry, pushed):
    response = record(registry, 1, [{"name": "accuracy", "value": 0.9}], repo="acme/nowhere")
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "repo_not_found"
    assert "acme/nowhere" in response.json()["detail"]
    assert audit(registry)[0]["action"] == "eval.refused"


def test_version_numbers_out_of_range_are_400(registry, pushed):
    assert record(registry, 0, [{"name": "a", "value": 1.0}]).status_code == 400
    assert record(registry, 2**31, [{"name": "a", "value": 1.0}]).status_code == 400


def test_a_yanked_version_still_takes_scores(registry, pushed, settings):
    yank_in_database(settings, REPO, 1, "leaks PII")
    response = record(registry, 1, [{"name": "toxicity", "value": 0.3}])
    assert response.status_code == 201, response.text
    assert [e["name"] for e in shown_evals(registry, 1)] == ["toxicity"]
    assert audit(registry)[0]["action"] == "eval"
