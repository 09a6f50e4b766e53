"""Rollback and yank through the API: rollback to the previous holder that is not yanked (or --to a former
holder), yank refused on an alias holder unless it rolls the aliases back, yanked versions refused by
resolve unless named exactly with allow_yanked, and the newest version skipping yanked ones. On
PostgreSQL, concurrent writes are forced to overlap (a lock held by the test) to show the database
deciding: two rollbacks of one alias, a rollback against a promotion, a yank against a promotion."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from _support.auth import act_as
from _support.database import sql
from sqlalchemy import text

from deltareg.registry.audit.repository import _POSTGRES_AUDIT_LOCK
from deltareg.registry.db import make_engine

pytestmark = pytest.mark.backends("fs")

REPO = "acme/bot"


# ---- helpers --------------------------------------------------------------------------------------


def push(registry: Any, seed: int, evals: dict[str, float] | None = None, *, by: str = "alice") -> int:
    files = registry.lora_files(seed)
    registry.upload_all(files)
    body = {
        "manifest": registry.manifest_for(files),
        "evals": [{"name": n, "value": v} for n, v in (evals or {}).items()],
    }
    response = registry.client.post(f"/api/v1/repos/{REPO}/versions", json=body, headers=registry.act_as(by))
    assert response.status_code == 201, response.text
    return int(response.json()["number"])


def promote(client: Any, alias: str, version: int, expected: int | None) -> Any:
    body = {"version": version, "expected": expected}
    return client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body, headers=act_as(client, "carol"))


def rollback(client: Any, alias: str, **body: Any) -> Any:
    return client.post(
        f"/api/v1/repos/{REPO}/aliases/{alias}/rollback", json=body, headers=act_as(client, "carol")
    )


def yank(client: Any, version: int, reason: str = "toxic outputs", **body: Any) -> Any:
    path = f"/api/v1/repos/{REPO}/versions/{version}/yank"
    return client.post(path, json={"reason": reason, **body}, headers=act_as(client, "sec"))


def resolve(registry: Any, ref: str, **params: Any) -> Any:
    return registry.client.get("/api/v1/resolve", params={"ref": ref, **params})


def holder(registry: Any, alias: str) -> int | None:
    response = registry.client.get(f"/api/v1/repos/{REPO}/aliases/{alias}")
    return None if response.status_code == 404 else int(response.json()["version"])


def moves(settings: Any, alias: str = "production") -> list[tuple[Any, ...]]:
    """(from, to, kind, reason) of every move of the alias, oldest first."""
    return sql(
        settings,
        "SELECT f.number, t.number, m.kind, m.reason FROM alias_moves m "
        "LEFT JOIN versions f ON f.id = m.from_version_id JOIN versions t ON t.id = m.to_version_id "
        "WHERE m.alias = :alias ORDER BY m.id",
        alias=alias,
    )


def audit(registry: Any) -> list[dict[str, Any]]:
    response = registry.client.get("/api/v1/audit", params={"repo": REPO, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["entries"]))


def yanked_columns(settings: Any, number: int) -> tuple[Any, ...]:
    return sql(settings, "SELECT yank_reason, yanked_by FROM versions WHERE number = :n", n=number)[0]


def promoted_through(registry: Any, *numbers: int, alias: str = "production") -> None:
    """Create ``alias`` at the first number, then promote to each next one."""
    previous = None
    for number in numbers:
        response = promote(registry.client, alias, number, previous)
        assert response.status_code == 200, response.text
        previous = number


# ---- rollback -------------------------------------------------------------------------------------


def test_rollback_moves_back_and_repeated_rollbacks_keep_going_back(registry):
    for seed in range(3):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    first = rollback(registry.client, "production", reason="latency spike")
    assert first.status_code == 200, first.text
    assert (first.json()["previous"], first.json()["version"], first.json()["moved"]) == (3, 2, True)
    second = rollback(registry.client, "production")
    assert (second.status_code, second.json()["version"]) == (200, 1)
    assert resolve(registry, f"{REPO}@production").json()["number"] == 1
    assert moves(registry.settings) == [
        (None, 1, "promote", None),
        (1, 2, "promote", None),
        (2, 3, "promote", None),
        (3, 2, "rollback", "latency spike"),
        (2, 1, "rollback", None),
    ]
    rollbacks = [e for e in audit(registry) if e["action"] == "alias.rollback"]
    assert [(e["actor"], e["details"]["from"], e["details"]["to"]) for e in rollbacks] == [
        ("carol", 3, 2),
        ("carol", 2, 1),
    ]
    assert rollbacks[0]["details"]["reason"] == "latency spike"
    nothing_left = rollback(registry.client, "production")
    assert (nothing_left.status_code, nothing_left.json()["error"]) == (409, "conflict")
    assert "has no previous holder to roll back to" in nothing_left.json()["detail"]
    assert holder(registry, "production") == 1


def test_rollback_skips_yanked_versions(registry):
    for seed in range(3):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    assert yank(registry.client, 2).status_code == 200
    response = rollback(registry.client, "production")
    assert (response.status_code, response.json()["version"]) == (200, 1), response.text
    assert audit(registry)[-1]["details"]["skipped_yanked"] == [2]


def test_rollback_with_only_yanked_former_holders_is_refused(registry):
    for seed in range(2):
        push(registry, seed)
    promoted_through(registry, 1, 2)
    assert yank(registry.client, 1).status_code == 200
    response = rollback(registry.client, "production")
    assert (response.status_code, response.json()["error"]) == (409, "conflict")
    assert "has no previous holder that is not yanked (yanked: 1)" in response.json()["detail"]
    assert holder(registry, "production") == 2
    assert audit(registry)[-1]["action"] == "alias.rollback.refused"


def test_rollback_to_a_former_holder(registry):
    for seed in range(4):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    to_first = rollback(registry.client, "production", to=1, reason="back to the known good")
    assert (to_first.status_code, to_first.json()["version"]) == (200, 1), to_first.text
    # 3 was rolled back from, but it held the alias: --to may return to it.
    assert rollback(registry.client, "production", to=3).json()["version"] == 3


@pytest.mark.parametrize(
    ("to", "status", "code", "fragment"),
    [
        (4, 400, "invalid_input", "version 4 of acme/bot never held alias production"),
        (3, 409, "conflict", "already points to 3"),
        (9, 404, "version_not_found", "has no version 9"),
        (1, 410, "version_yanked", "version 1 of acme/bot is yanked (bad tokenizer)"),
    ],
)
def test_rollback_to_a_version_that_cannot_hold_the_alias_is_refused(registry, to, status, code, fragment):
    for seed in range(4):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    assert yank(registry.client, 1, "bad tokenizer").status_code == 200
    before = moves(registry.settings)
    response = rollback(registry.client, "production", to=to)
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert fragment in response.json()["detail"]
    if to == 4:
        assert "use promote" in response.json()["detail"]
    assert holder(registry, "production") == 3
    assert moves(registry.settings) == before


def test_rollback_of_an_undefined_alias_and_a_stale_expectation(registry):
    for seed in range(2):
        push(registry, seed)
    missing = rollback(registry.client, "production")
    assert (missing.status_code, missing.json()["error"]) == (404, "alias_not_found")
    promoted_through(registry, 1, 2)
    stale = rollback(registry.client, "production", expected=1)
    assert (stale.status_code, stale.json()["error"]) == (409, "conflict")
    assert "points to 2, not 1 as expected" in stale.json()["detail"]
    assert rollback(registry.client, "production", expected=2).json()["version"] == 1


def test_rollback_does_not_apply_the_policy(registry):
    """The version held the alias before: a rollback must work when the policy would now refuse it."""
    push(registry, 0, {"accuracy": 0.5})
    push(registry, 1, {"accuracy": 0.95})
    promoted_through(registry, 1, 2)
    policy = {"min": {"accuracy": 0.9}, "approvals": 3}
    assert (
        registry.client.put(f"/api/v1/repos/{REPO}/aliases/production/policy", json=policy).status_code == 200
    )
    response = rollback(registry.client, "production")
    assert (response.status_code, response.json()["version"]) == (200, 1), response.text


# ---- yank -----------------------------------------------------------------------------------------


def test_yank_keeps_the_version_readable_and_refuses_it_to_resolve(registry):
    digests = {}
    for seed in range(3):
        number = push(registry, seed)
        digests[number] = resolve(registry, f"{REPO}:{number}").json()["digest"]
    response = yank(registry.client, 3, "  leaks training data  ")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["number"], body["digest"], body["rolled_back"]) == (3, digests[3], [])
    assert (body["yanked"]["reason"], body["yanked"]["by"]) == ("leaks training data", "sec")
    assert yanked_columns(registry.settings, 3) == ("leaks training data", "sec")

    shown = registry.client.get(f"/api/v1/repos/{REPO}/versions/3")
    assert shown.status_code == 200
    assert shown.json()["yanked"]["reason"] == "leaks training data"
    listed = registry.client.get(f"/api/v1/repos/{REPO}").json()["versions"]
    assert [v["yanked"] is not None for v in listed] == [True, False, False]

    for ref in (f"{REPO}:3", f"{REPO}@{digests[3]}"):
        refused = resolve(registry, ref)
        assert (refused.status_code, refused.json()["error"]) == (410, "version_yanked")
        detail = refused.json()["detail"]
        assert "acme/bot:3 was yanked by sec" in detail and "leaks training data" in detail
        assert "pass allow_yanked=true / --allow-yanked to pull it anyway" in detail
        allowed = resolve(registry, ref, allow_yanked="true")
        assert (allowed.status_code, allowed.json()["number"]) == (200, 3)
        assert allowed.json()["yanked"]["reason"] == "leaks training data"
    # The newest version is the newest one not yanked; allow_yanked does not change that.
    assert resolve(registry, REPO).json()["number"] == 2
    assert resolve(registry, REPO, allow_yanked="true").json()["number"] == 2

    entry = audit(registry)[-1]
    assert (entry["action"], entry["actor"], entry["target"]) == ("yank", "sec", f"{REPO}:3")
    assert entry["details"] == {
        "version": 3,
        "digest": digests[3],
        "reason": "leaks training data",
        "rolled_back": [],
    }


def test_when_every_version_is_yanked_the_newest_is_refused(registry):
    push(registry, 0)
    push(registry, 1)
    yank(registry.client, 2)
    yank(registry.client, 1)
    refused = resolve(registry, REPO)
    assert (refused.status_code, refused.json()["error"]) == (410, "version_yanked")
    assert "every version of acme/bot is yanked" in refused.json()["detail"]


def test_yanking_twice_is_a_conflict_giving_the_first_reason(registry):
    push(registry, 0)
    assert yank(registry.client, 1, "first reason").status_code == 200
    again = registry.client.post(
        f"/api/v1/repos/{REPO}/versions/1/yank", json={"reason": "second"}, headers=registry.act_as("mallory")
    )
    assert (again.status_code, again.json()["error"]) == (409, "conflict")
    assert "acme/bot:1 was already yanked by sec" in again.json()["detail"]
    assert "first reason" in again.json()["detail"]
    assert yanked_columns(registry.settings, 1) == ("first reason", "sec")
    assert [e["action"] for e in audit(registry)][-2:] == ["yank", "yank.refused"]


def test_yanking_an_alias_holder_without_rollback_is_refused(registry):
    for seed in range(2):
        push(registry, seed)
    promoted_through(registry, 1, 2, alias="production")
    promoted_through(registry, 2, alias="staging")
    entries = len(audit(registry))
    refused = yank(registry.client, 2)
    assert (refused.status_code, refused.json()["error"]) == (409, "conflict")
    detail = refused.json()["detail"]
    assert "aliases production, staging point to it" in detail and "rollback=true (--rollback)" in detail
    assert yanked_columns(registry.settings, 2) == (None, None)
    assert (holder(registry, "production"), holder(registry, "staging")) == (2, 2)
    assert [e["action"] for e in audit(registry)[entries:]] == ["yank.refused"]


def test_yank_with_rollback_moves_every_alias_back(registry):
    for seed in range(3):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3, alias="production")
    promoted_through(registry, 1, 3, alias="staging")
    promoted_through(registry, 2, alias="canary")  # not on 3: untouched
    response = yank(registry.client, 3, "regression in prod", rollback=True)
    assert response.status_code == 200, response.text
    assert response.json()["rolled_back"] == [
        {"alias": "production", "previous": 3, "version": 2},
        {"alias": "staging", "previous": 3, "version": 1},
    ]
    assert (holder(registry, "production"), holder(registry, "staging"), holder(registry, "canary")) == (
        2,
        1,
        2,
    )
    assert moves(registry.settings)[-1] == (3, 2, "rollback", "yank of version 3: regression in prod")
    tail = audit(registry)[-3:]
    assert [(e["action"], e["target"]) for e in tail] == [
        ("alias.rollback", f"{REPO}@production"),
        ("alias.rollback", f"{REPO}@staging"),
        ("yank", f"{REPO}:3"),
    ]
    assert tail[2]["details"]["rolled_back"] == [
        {"alias": "production", "from": 3, "to": 2},
        {"alias": "staging", "from": 3, "to": 1},
    ]


def test_yank_with_rollback_is_refused_whole_when_an_alias_has_nowhere_to_go(registry):
    for seed in range(2):
        push(registry, seed)
    promoted_through(registry, 1, 2, alias="production")
    promoted_through(registry, 2, alias="staging")  # 2 is its only holder
    before = moves(registry.settings) + moves(registry.settings, "staging")
    refused = yank(registry.client, 2, rollback=True)
    assert (refused.status_code, refused.json()["error"]) == (409, "conflict"), refused.text
    assert (
        "cannot yank acme/bot:2: alias staging of acme/bot (at version 2) has no previous holder"
        in (refused.json()["detail"])
    )
    assert (holder(registry, "production"), holder(registry, "staging")) == (2, 2)
    assert moves(registry.settings) + moves(registry.settings, "staging") == before
    assert yanked_columns(registry.settings, 2) == (None, None)
    assert audit(registry)[-1]["action"] == "yank.refused"


def test_a_yanked_version_cannot_be_promoted(registry):
    push(registry, 0)
    push(registry, 1)
    promoted_through(registry, 1)
    yank(registry.client, 2, "broken")
    for expected, alias in ((1, "production"), (None, "staging")):
        refused = promote(registry.client, alias, 2, expected)
        assert (refused.status_code, refused.json()["error"]) == (410, "version_yanked")
        assert "version 2 of acme/bot is yanked (broken)" in refused.json()["detail"]
    assert (holder(registry, "production"), holder(registry, "staging")) == (1, None)
    assert [e["action"] for e in audit(registry)][-2:] == ["alias.promote.refused", "alias.promote.refused"]
    approval = registry.client.post(
        f"/api/v1/repos/{REPO}/versions/2/approvals",
        json={"alias": "production"},
        headers=registry.act_as("bob"),
    )
    assert (approval.status_code, approval.json()["error"]) == (410, "version_yanked")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_input"),
        ({"reason": ""}, 400, "invalid_input"),
        ({"reason": "   "}, 400, "invalid_input"),
        ({"reason": "x" * 1001}, 400, "invalid_input"),
        ({"reason": "ok", "rollback": "maybe"}, 400, "invalid_input"),
        ({"reason": "ok", "force": True}, 400, "invalid_input"),
    ],
)
def test_bad_yanks_are_refused(registry, body, status, code):
    push(registry, 0)
    response = registry.client.post(f"/api/v1/repos/{REPO}/versions/1/yank", json=body)
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert yanked_columns(registry.settings, 1) == (None, None)


def test_yank_of_an_unknown_version(registry):
    push(registry, 0)
    response = yank(registry.client, 5)
    assert (response.status_code, response.json()["error"]) == (404, "version_not_found")


# ---- concurrency on PostgreSQL: overlapping writes, forced by a lock the test holds ------------------


class Blocker:
    """Holds the audit log's lock (every write takes it last, before commit) so that writes sent now
    pile up inside their transactions; ``release`` lets them finish, in the database's order."""

    def __init__(self, settings: Any) -> None:
        self.engine = make_engine(settings.database_url)
        self.connection = self.engine.connect()
        self.connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _POSTGRES_AUDIT_LOCK})
        self.connection.commit()

    def wait_for_waiters(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` other sessions of this database wait on a lock (not a timing assertion: the
        deadline only turns a hang into a failure)."""
        deadline = time.monotonic() + timeout
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        while time.monotonic() < deadline:
            waiting = self.connection.execute(query).scalar_one()
            self.connection.commit()
            if waiting >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"{count} writes never got to wait on a lock")

    def release(self) -> None:
        self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _POSTGRES_AUDIT_LOCK})
        self.connection.commit()

    def close(self) -> None:
        self.connection.close()
        self.engine.dispose()


def overlap(settings: Any, *writes: Callable[[], Any]) -> list[Any]:
    """Run the writes in threads, each started once the previous one waits on a lock, then release them."""
    blocker = Blocker(settings)
    try:
        with ThreadPoolExecutor(max_workers=len(writes)) as pool:
            futures = []
            for i, write in enumerate(writes):
                futures.append(pool.submit(write))
                blocker.wait_for_waiters(i + 1)
            blocker.release()
            return [future.result(timeout=120) for future in futures]
    finally:
        blocker.close()


@pytest.mark.backends("postgres-fs")
def test_two_concurrent_rollbacks_of_one_alias_have_exactly_one_winner(registry, make_registry):
    for seed in range(3):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    with make_registry() as replica:  # a second app on the same database: another server replica
        answers = overlap(
            registry.settings,
            lambda: rollback(registry.client, "production", reason="first"),
            lambda: rollback(replica.client, "production", reason="second"),
        )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 409], [a.text for a in answers]
    loser = next(a for a in answers if a.status_code == 409)
    assert "points to 2, not 3 as expected" in loser.json()["detail"]
    assert holder(registry, "production") == 2
    assert [m[2] for m in moves(registry.settings)].count("rollback") == 1
    actions = [e["action"] for e in audit(registry)]
    assert (actions.count("alias.rollback"), actions.count("alias.rollback.refused")) == (1, 1)


@pytest.mark.backends("postgres-fs")
def test_a_rollback_racing_a_promotion_never_both_win(registry, make_registry):
    for seed in range(4):
        push(registry, seed)
    promoted_through(registry, 1, 2, 3)
    with make_registry() as replica:
        answers = overlap(
            registry.settings,
            lambda: promote(registry.client, "production", 4, 3),
            lambda: rollback(replica.client, "production"),
        )
    assert [a.status_code for a in answers] == [200, 409], [a.text for a in answers]
    assert holder(registry, "production") == 4
    assert moves(registry.settings)[-1] == (3, 4, "promote", None)


@pytest.mark.backends("postgres-fs")
def test_a_yank_racing_a_promotion_of_the_same_version_never_leaves_an_alias_on_it(registry, make_registry):
    """The yank has marked the version and found no alias on it when the promotion starts; the promotion
    must wait for the yank and see it, rather than read the version as not yanked."""
    for seed in range(2):
        push(registry, seed)
    promoted_through(registry, 1)
    with make_registry() as replica:
        answers = overlap(
            registry.settings,
            lambda: yank(registry.client, 2, "found in a red-team run"),
            lambda: promote(replica.client, "production", 2, 1),
        )
    assert [a.status_code for a in answers] == [200, 410], [a.text for a in answers]
    assert "version 2 of acme/bot is yanked (found in a red-team run)" in answers[1].json()["detail"]
    assert holder(registry, "production") == 1
    on_yanked = sql(
        registry.settings,
        "SELECT count(*) FROM aliases a JOIN versions v ON v.id = a.version_id WHERE v.yanked_at IS NOT NULL",
    )
    assert on_yanked == [(0,)]


@pytest.mark.backends("postgres-fs")
def test_a_promotion_racing_a_yank_makes_the_yank_see_the_alias(registry, make_registry):
    for seed in range(2):
        push(registry, seed)
    promoted_through(registry, 1)
    with make_registry() as replica:
        answers = overlap(
            registry.settings,
            lambda: promote(registry.client, "production", 2, 1),
            lambda: yank(replica.client, 2, "too late"),
        )
    assert [a.status_code for a in answers] == [200, 409], [a.text for a in answers]
    assert "alias production points to it" in answers[1].json()["detail"]
    assert holder(registry, "production") == 2
    assert yanked_columns(registry.settings, 2) == (None, None)
