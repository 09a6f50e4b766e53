"""The audit log: every write appends a chained entry in its own transaction, refusals are recorded, and
`verify` names the first entry that was changed, removed or reordered. Also the alias history (every
move, and where an alias pointed at a given time)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _support.database import sql

pytestmark = pytest.mark.backends("sqlite-fs", "postgres-fs")

REPO = "acme/bot"


def entries(registry: Any, **params: Any) -> list[dict[str, Any]]:
    response = registry.client.get("/api/v1/audit", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["entries"])


def verify(registry: Any) -> dict[str, Any]:
    response = registry.client.get("/api/v1/audit/verify")
    assert response.status_code == 200, response.text
    return dict(response.json())


def promote(registry: Any, alias: str, version: int, expected: int | None, *, as_: str = "alice") -> Any:
    return registry.client.put(
        f"/api/v1/repos/{REPO}/aliases/{alias}",
        json={"version": version, "expected": expected, "reason": f"ship {version}"},
        headers=registry.act_as(as_),
    )


@pytest.fixture
def pushed(registry: Any) -> list[dict[str, Any]]:
    """Three versions pushed by alice, bob and alice."""
    versions = []
    admin = registry.client.headers["Authorization"]
    for seed, who in enumerate(("alice", "bob", "alice")):
        registry.client.headers.update(registry.act_as(who))
        versions.append(registry.push(REPO, registry.lora_files(seed)))
    registry.client.headers["Authorization"] = admin
    return versions


def test_pushes_and_moves_are_appended_with_actor_and_chained(registry, pushed):
    assert promote(registry, "production", 1, None).status_code == 200
    assert promote(registry, "production", 2, 1, as_="carol").status_code == 200

    log = entries(registry)
    assert [(e["id"], e["actor"], e["action"], e["target"]) for e in log] == [
        (5, "carol", "alias.promote", f"{REPO}@production"),
        (4, "alice", "alias.promote", f"{REPO}@production"),
        (3, "alice", "push", f"{REPO}:3"),
        (2, "bob", "push", f"{REPO}:2"),
        (1, "alice", "push", f"{REPO}:1"),
    ]
    assert log[0]["details"] | {"digest": None} == {
        "alias": "production",
        "from": 1,
        "to": 2,
        "digest": None,
        "reason": "ship 2",
    }
    assert log[-1]["details"]["digest"] == pushed[0]["digest"]
    # Each entry carries the hash of the one before it.
    assert [e["prev_hash"] for e in log[:-1]] == [e["entry_hash"] for e in log[1:]]
    assert log[-1]["prev_hash"] == "sha256:" + "0" * 64
    assert verify(registry) == {
        "ok": True,
        "entries": 5,
        "head_hash": log[0]["entry_hash"],
        "first_broken": None,
    }
    assert [v["pushed_by"] for v in pushed] == ["alice", "bob", "alice"]


def test_an_identical_re_push_is_not_a_new_entry(registry, pushed):
    registry.push(REPO, registry.lora_files(0))
    assert len(entries(registry)) == 3


def test_a_refused_move_changes_nothing_but_is_audited(registry, pushed, settings):
    assert promote(registry, "production", 1, None).status_code == 200
    stale = promote(registry, "production", 3, 2, as_="mallory")
    assert stale.status_code == 409, stale.text

    newest = entries(registry)[0]
    assert (newest["actor"], newest["action"], newest["target"]) == (
        "mallory",
        "alias.promote.refused",
        f"{REPO}@production",
    )
    assert newest["details"]["error"] == "conflict" and "points to 1, not 2" in newest["details"]["detail"]
    assert sql(settings, "SELECT count(*) FROM alias_moves") == [(1,)]
    assert registry.client.get(f"/api/v1/repos/{REPO}/aliases/production").json()["version"] == 1
    assert verify(registry)["ok"]


def test_a_refused_push_is_audited_without_a_version(registry, settings):
    manifest_of_missing_blobs = registry.manifest_for(registry.lora_files(0))
    response = registry.create_version(REPO, manifest_of_missing_blobs)
    assert response.status_code == 400, response.text

    [entry] = entries(registry)
    assert (entry["action"], entry["target"], entry["details"]["error"]) == (
        "push.refused",
        REPO,
        "missing_blob",
    )
    assert sql(settings, "SELECT count(*) FROM versions") == [(0,)]


@pytest.mark.parametrize(
    "column, value",
    [
        ("details", '{"digest":"sha256:forged","version":2}'),
        ("actor", "someone-else"),
        ("created_at", None),  # moved by an hour
    ],
)
def test_verify_names_the_first_entry_that_was_edited_in_the_database(
    registry, pushed, settings, column, value
):
    if column == "created_at":
        sql(
            settings,
            "UPDATE audit_log SET created_at = :at WHERE id = 2",
            at=datetime.now(UTC) - timedelta(hours=1),
        )
    else:
        sql(settings, f"UPDATE audit_log SET {column} = :value WHERE id = 2", value=value)

    report = verify(registry)
    assert report["ok"] is False
    assert report["first_broken"] == {
        "id": 2,
        "problem": "its content does not match its hash (the entry was changed)",
    }
    assert report["entries"] == 2


def test_verify_detects_a_removed_entry_and_a_rehashed_one(registry, pushed, settings):
    sql(settings, "DELETE FROM audit_log WHERE id = 2")
    assert verify(registry)["first_broken"] == {"id": 3, "problem": "entries 2..2 are missing"}

    # Re-hashing an edited entry to hide the edit breaks the link from the entry after it.
    sql(settings, "DELETE FROM audit_log WHERE id = 3")
    sql(settings, "UPDATE audit_log SET id = 2 WHERE id = 1")
    assert verify(registry)["first_broken"] == {"id": 2, "problem": "entries 1..1 are missing"}


def test_verify_detects_a_forged_link(registry, pushed, settings):
    sql(settings, "UPDATE audit_log SET prev_hash = :h WHERE id = 3", h="sha256:" + "1" * 64)
    assert verify(registry)["first_broken"] == {
        "id": 3,
        "problem": "its prev_hash does not match the hash of the entry before it",
    }


def test_list_by_repo_and_page(registry, pushed):
    registry.push("acme/other", registry.lora_files(7))
    assert [e["target"] for e in entries(registry, repo="acme/other")] == ["acme/other:1"]

    first = registry.client.get("/api/v1/audit", params={"repo": REPO, "limit": 2}).json()
    assert [e["id"] for e in first["entries"]] == [3, 2]
    rest = entries(registry, repo=REPO, limit=2, before_id=first["next_before_id"])
    assert [e["id"] for e in rest] == [1]


def test_the_recorded_actor_is_the_tokens_name_not_a_declared_one(registry):
    files = registry.lora_files(0)
    registry.upload_all(files)
    body = {"manifest": registry.manifest_for(files)}
    headers = {**registry.act_as("alice"), "X-Deltareg-Actor": "mallory"}
    response = registry.client.post(f"/api/v1/repos/{REPO}/versions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["pushed_by"] == "alice"
    assert [e["actor"] for e in entries(registry, repo=REPO)] == ["alice"]


def test_the_bootstrap_token_acts_as_bootstrap(registry):
    registry.push(REPO, registry.lora_files(0))  # with DELTAREG_BOOTSTRAP_TOKEN, the test client's default
    assert entries(registry)[0]["actor"] == "bootstrap"


def test_an_invalid_repo_name_is_refused_and_audited_without_a_repo(registry):
    response = registry.create_version("acme/a%00b", {"schema": "x"})
    assert response.status_code == 400
    [entry] = entries(registry)
    assert entry["repo"] is None and entry["target"] == "acme/a\\x00b"
    assert verify(registry)["ok"]


# ---- alias history


def test_alias_history_lists_every_move(registry, pushed):
    promote(registry, "production", 1, None)
    promote(registry, "production", 3, 1, as_="carol")
    response = registry.client.get(f"/api/v1/repos/{REPO}/aliases/production/history")
    assert response.status_code == 200, response.text
    moves = response.json()["moves"]
    assert [(m["kind"], m["from_version"], m["to_version"], m["actor"], m["reason"]) for m in moves] == [
        ("promote", 1, 3, "carol", "ship 3"),
        ("promote", None, 1, "alice", "ship 1"),
    ]


def test_where_an_alias_pointed_at_a_time(registry, pushed, settings):
    promote(registry, "production", 1, None)
    promote(registry, "production", 2, 1)
    promote(registry, "production", 3, 2)
    # Spread the moves out in time so that the test does not depend on clock resolution.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for index, (move_id,) in enumerate(sql(settings, "SELECT id FROM alias_moves ORDER BY id")):
        sql(
            settings,
            "UPDATE alias_moves SET created_at = :at WHERE id = :id",
            at=start + timedelta(days=index),
            id=move_id,
        )

    def at(moment: datetime) -> Any:
        return registry.client.get(
            f"/api/v1/repos/{REPO}/aliases/production/at", params={"time": moment.isoformat()}
        )

    assert at(start + timedelta(hours=12)).json()["version"] == 1
    assert at(start + timedelta(days=1)).json()["version"] == 2  # at the very moment of the move
    assert at(start + timedelta(days=1, hours=23)).json()["version"] == 2
    assert at(start + timedelta(days=30)).json()["version"] == 3
    early = at(start - timedelta(seconds=1))
    assert early.status_code == 404 and "did not exist at" in early.json()["detail"]
    naive = registry.client.get(
        f"/api/v1/repos/{REPO}/aliases/production/at", params={"time": "2026-01-01T12:00:00"}
    )
    assert naive.status_code == 400 and "UTC offset" in naive.json()["detail"]


def test_history_of_an_unknown_alias_or_repo(registry, pushed):
    assert registry.client.get(f"/api/v1/repos/{REPO}/aliases/nope/history").status_code == 404
    assert registry.client.get("/api/v1/repos/acme/none/aliases/production/history").status_code == 404
