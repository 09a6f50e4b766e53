"""Promotion policies through the API: set/show/delete (audited), every rule refusing on its own with its
message, every failed rule listed at once, approvals (not from the pusher, not anonymous, per alias), and a
refused promotion changing nothing but one ``alias.promote.refused`` audit entry."""

from __future__ import annotations

from typing import Any

import pytest
from _support.database import sql

pytestmark = pytest.mark.backends("fs")

REPO = "acme/bot"


# ---- helpers --------------------------------------------------------------------------------------


def push(
    registry: Any, seed: int, evals: dict[str, float] | list[tuple[str, float]], *, by: str = "alice"
) -> int:
    """Push a version with evals (recorded at push time) as ``by``; its number."""
    files = registry.lora_files(seed)
    registry.upload_all(files)
    pairs = evals.items() if isinstance(evals, dict) else evals
    body = {"manifest": registry.manifest_for(files), "evals": [{"name": n, "value": v} for n, v in pairs]}
    response = registry.client.post(f"/api/v1/repos/{REPO}/versions", json=body, headers=registry.act_as(by))
    assert response.status_code == 201, response.text
    return int(response.json()["number"])


def promote(registry: Any, alias: str, version: int, expected: int | None, *, by: str = "carol") -> Any:
    body = {"version": version, "expected": expected}
    return registry.client.put(
        f"/api/v1/repos/{REPO}/aliases/{alias}", json=body, headers=registry.act_as(by)
    )


def set_policy(registry: Any, alias: str, policy: dict[str, Any], *, by: str = "admin") -> Any:
    path = f"/api/v1/repos/{REPO}/aliases/{alias}/policy"
    return registry.client.put(path, json=policy, headers=registry.act_as(by))


def approve(registry: Any, version: int, alias: str, *, by: str | None, comment: str | None = None) -> Any:
    headers = registry.act_as(by) if by else {"Authorization": ""}  # "": no token
    path = f"/api/v1/repos/{REPO}/versions/{version}/approvals"
    return registry.client.post(path, json={"alias": alias, "comment": comment}, headers=headers)


def holder(registry: Any, alias: str) -> int | None:
    response = registry.client.get(f"/api/v1/repos/{REPO}/aliases/{alias}")
    return None if response.status_code == 404 else int(response.json()["version"])


def audit(registry: Any) -> list[dict[str, Any]]:
    """The repo's audit entries, oldest first."""
    response = registry.client.get("/api/v1/audit", params={"repo": REPO, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["entries"]))


def actions(registry: Any) -> list[str]:
    return [entry["action"] for entry in audit(registry)]


def count(settings: Any, table: str) -> int:
    return int(sql(settings, f"SELECT count(*) FROM {table}")[0][0])


# ---- setting, showing and deleting policies -----------------------------------------------------

POLICY = {
    "min": {"accuracy": 0.8},
    "max": {"loss": 1.2},
    "no_regression": [{"metric": "accuracy", "tolerance": 0.01, "higher_is_better": True}],
    "approvals": 2,
    "require_signature": False,
}


def test_set_show_replace_and_delete_a_policy_all_audited(registry):
    push(registry, 0, {})
    created = set_policy(registry, "production", POLICY, by="admin")
    assert created.status_code == 200, created.text
    assert created.json()["policy"] == POLICY
    assert (created.json()["repo"], created.json()["alias"], created.json()["updated_by"]) == (
        REPO,
        "production",
        "admin",
    )
    shown = registry.client.get(f"/api/v1/repos/{REPO}/aliases/production/policy")
    assert (shown.status_code, shown.json()["policy"]) == (200, POLICY)

    replaced = set_policy(registry, "production", {"approvals": 1}, by="root")
    assert replaced.status_code == 200, replaced.text
    normalized = {"min": {}, "max": {}, "no_regression": [], "approvals": 1, "require_signature": False}
    assert replaced.json()["policy"] == normalized
    set_policy(registry, "staging", {"min": {"f1": 0.5}})
    listed = registry.client.get(f"/api/v1/repos/{REPO}/policies").json()
    assert [(p["alias"], p["policy"]["approvals"]) for p in listed["policies"]] == [
        ("production", 1),
        ("staging", 0),
    ]

    deleted = registry.client.delete(
        f"/api/v1/repos/{REPO}/aliases/production/policy", headers=registry.act_as("root")
    )
    assert (deleted.status_code, deleted.json()["policy"]) == (200, normalized)
    gone = registry.client.get(f"/api/v1/repos/{REPO}/aliases/production/policy")
    assert (gone.status_code, gone.json()["error"]) == (404, "not_found")
    again = registry.client.delete(f"/api/v1/repos/{REPO}/aliases/production/policy")
    assert again.status_code == 404

    entries = [e for e in audit(registry) if e["action"].startswith("policy.")]
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("policy.set", "admin", f"{REPO}@production"),
        ("policy.set", "root", f"{REPO}@production"),
        ("policy.set", "admin", f"{REPO}@staging"),
        ("policy.delete", "root", f"{REPO}@production"),
        ("policy.delete.refused", "bootstrap", f"{REPO}@production"),
    ]
    assert (entries[0]["details"]["old"], entries[0]["details"]["new"]) == (None, POLICY)
    assert (entries[1]["details"]["old"], entries[1]["details"]["new"]) == (POLICY, normalized)
    assert entries[3]["details"]["old"] == normalized


def test_a_policy_needs_an_existing_repo(registry):
    response = set_policy(registry, "production", POLICY)
    assert (response.status_code, response.json()["error"]) == (404, "repo_not_found")
    assert count(registry.settings, "alias_policies") == 0


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"min": {"accuracy": NaN}}', "finite number"),
        ('{"max": {"loss": Infinity}}', "finite number"),
        ('{"min": {"accuracy": 1e999}}', "finite number"),
        ('{"min": {"bad name": 0.5}}', "should match pattern"),
        ('{"min": {"accuracy": 0.9}, "max": {"accuracy": 0.5}}', "minimum above maximum for accuracy"),
        ("{}", "at least one rule"),
        ('{"approvals": 0, "require_signature": false}', "at least one rule"),
        ('{"approvals": -1}', "greater than or equal to 0"),
        ('{"approvals": 101}', "less than or equal to 100"),
        ('{"no_regression": [{"metric": "accuracy", "tolerance": -0.1}]}', "greater than or equal to 0"),
        (
            '{"no_regression": [{"metric": "accuracy"}, {"metric": "accuracy", "tolerance": 0.1}]}',
            "names accuracy more than once",
        ),
        ('{"min": {"accuracy": 0.5}, "signed": true}', "Extra inputs are not permitted"),
        ('{"min": {' + ", ".join(f'"m{i}": 0' for i in range(33)) + "}}", "at most 32 items"),
        ("[1]", "Input should be an object"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(registry, raw, fragment):
    push(registry, 0, {})
    response = registry.client.put(
        f"/api/v1/repos/{REPO}/aliases/production/policy",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), response.text
    assert fragment in response.json()["detail"]
    assert count(registry.settings, "alias_policies") == 0


def test_a_policy_on_a_bad_alias_name_is_refused(registry):
    push(registry, 0, {})
    response = set_policy(registry, "Production", POLICY)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_name")


# ---- each rule on its own -------------------------------------------------------------------------

# (policy, holder's evals, target's evals, approvers of the target, the failure message)
RULES = {
    "min": (
        {"min": {"accuracy": 0.8}},
        {"accuracy": 0.9},
        {"accuracy": 0.71},
        [],
        "accuracy 0.71 < minimum 0.8",
    ),
    "max": ({"max": {"loss": 1.2}}, {"loss": 1.0}, {"loss": 1.5}, [], "loss 1.5 > maximum 1.2"),
    "missing metric": (
        {"min": {"f1": 0.5}},
        {"f1": 0.9},
        {"accuracy": 0.9},
        [],
        "version 2 lacks metric f1 required by the policy",
    ),
    "no regression": (
        {"no_regression": [{"metric": "accuracy", "tolerance": 0.01}]},
        {"accuracy": 0.85},
        {"accuracy": 0.79},
        [],
        "accuracy 0.79 regresses from 0.85 held by version 1 (tolerance 0.01)",
    ),
    "no regression, lower is better": (
        {"no_regression": [{"metric": "loss", "tolerance": 0.1, "higher_is_better": False}]},
        {"loss": 1.0},
        {"loss": 1.2},
        [],
        "loss 1.2 regresses from 1.0 held by version 1 (lower is better, tolerance 0.1)",
    ),
    "approvals": (
        {"approvals": 2},
        {},
        {},
        ["bob"],
        "1 of 2 approvals for production: bob (approvals from the pusher alice do not count)",
    ),
    "signature": (
        {"require_signature": True},
        {},
        {"accuracy": 1.0},
        [],
        "signature required: version 2 has no signature by a key of the namespace that is not revoked",
    ),
}

# The same rules, met (a signature is met in tests/registry/test_signing.py, which registers keys).
PASSING = {
    "min": ({"accuracy": 0.8}, []),  # the minimum itself passes
    "max": ({"loss": 1.2}, []),
    "missing metric": ({"f1": 0.5}, []),
    "no regression": ({"accuracy": 0.84}, []),  # a drop of exactly the tolerance passes
    "no regression, lower is better": ({"loss": 1.1}, []),
    "approvals": ({}, ["bob", "dave"]),
}


def _production_at_v1_with_policy(
    registry: Any, policy: dict[str, Any], holder_evals: dict[str, float]
) -> None:
    assert push(registry, 1, holder_evals) == 1
    assert promote(registry, "production", 1, None).status_code == 200
    assert set_policy(registry, "production", policy).status_code == 200


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_alone_refuses_with_its_message_and_nothing_changes(registry, rule):
    policy, holder_evals, target_evals, approvers, message = RULES[rule]
    _production_at_v1_with_policy(registry, policy, holder_evals)
    assert push(registry, 2, target_evals, by="alice") == 2
    assert approve(registry, 2, "production", by="alice").status_code == 403  # the pusher's never counts
    for who in approvers:
        assert approve(registry, 2, "production", by=who).status_code == 201
    moves, entries = count(registry.settings, "alias_moves"), len(audit(registry))

    refused = promote(registry, "production", 2, 1)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "policy_violation"
    detail = refused.json()["detail"]
    assert detail == (
        f"the policy of alias production of {REPO} refuses version 2 (1 rule failed): "
        f"{message}; nothing changed"
    )
    assert refused.json()["failed_rules"] == [message]  # for programs: the same rules, as a list
    assert holder(registry, "production") == 1
    assert count(registry.settings, "alias_moves") == moves
    new = audit(registry)[entries:]
    assert [(e["action"], e["target"], e["actor"]) for e in new] == [
        ("alias.promote.refused", f"{REPO}@production", "carol")
    ]
    assert new[0]["details"]["error"] == "policy_violation"
    assert new[0]["details"]["detail"] == detail


@pytest.mark.parametrize("rule", list(PASSING))
def test_each_rule_met_lets_the_promotion_through(registry, rule):
    policy, holder_evals, _failing, _approvers, _message = RULES[rule]
    target_evals, approvers = PASSING[rule]
    _production_at_v1_with_policy(registry, policy, holder_evals)
    push(registry, 2, target_evals)
    for who in approvers:
        assert approve(registry, 2, "production", by=who).status_code == 201
    moved = promote(registry, "production", 2, 1)
    assert moved.status_code == 200, moved.text
    assert holder(registry, "production") == 2
    assert actions(registry)[-1] == "alias.promote"


def test_every_failed_rule_is_listed(registry):
    policy = {
        "min": {"accuracy": 0.8, "f1": 0.5},
        "max": {"loss": 1.2},
        "no_regression": [{"metric": "accuracy", "tolerance": 0.01}],
        "approvals": 2,
        "require_signature": True,
    }
    _production_at_v1_with_policy(registry, policy, {"accuracy": 0.85})
    push(registry, 2, {"accuracy": 0.71, "loss": 1.5})
    approve(registry, 2, "production", by="bob")
    refused = promote(registry, "production", 2, 1)
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        f"the policy of alias production of {REPO} refuses version 2 (6 rules failed): "
        "version 2 lacks metric f1 required by the policy; "
        "accuracy 0.71 < minimum 0.8; "
        "loss 1.5 > maximum 1.2; "
        "accuracy 0.71 regresses from 0.85 held by version 1 (tolerance 0.01); "
        "1 of 2 approvals for production: bob (approvals from the pusher alice do not count); "
        "signature required: version 2 has no signature by a key of the namespace "
        "that is not revoked; nothing changed"
    )
    assert holder(registry, "production") == 1


def test_the_newest_value_of_a_metric_counts(registry):
    _production_at_v1_with_policy(registry, {"min": {"accuracy": 0.8}}, {})
    push(registry, 2, [("accuracy", 0.9), ("accuracy", 0.7)])  # measured twice: 0.7 is the newest
    push(registry, 3, [("accuracy", 0.7), ("accuracy", 0.9)])
    refused = promote(registry, "production", 2, 1)
    assert refused.status_code == 403
    assert "accuracy 0.7 < minimum 0.8" in refused.json()["detail"]
    assert promote(registry, "production", 3, 1).status_code == 200


def test_no_regression_passes_when_there_is_nothing_to_regress_from(registry):
    """The holder lacks the metric, or the move creates the alias: the rule passes; the target must
    still have the metric."""
    policy = {"no_regression": [{"metric": "accuracy", "tolerance": 0.0}]}
    _production_at_v1_with_policy(registry, policy, {"loss": 1.0})
    push(registry, 2, {"accuracy": 0.1})
    assert promote(registry, "production", 2, 1).status_code == 200
    assert set_policy(registry, "canary", policy).status_code == 200
    assert promote(registry, "canary", 2, None).status_code == 200  # created: no holder
    push(registry, 3, {"loss": 0.5})
    refused = promote(registry, "production", 3, 2)
    assert "version 3 lacks metric accuracy required by the policy" in refused.json()["detail"]


def test_the_policy_guards_the_creation_of_the_alias_too(registry):
    push(registry, 0, {"accuracy": 0.5})
    set_policy(registry, "production", {"min": {"accuracy": 0.8}})
    refused = promote(registry, "production", 1, None)
    assert (refused.status_code, refused.json()["error"]) == (403, "policy_violation")
    assert "accuracy 0.5 < minimum 0.8" in refused.json()["detail"]
    assert holder(registry, "production") is None
    assert count(registry.settings, "alias_moves") == 0


def test_a_policy_binds_its_alias_only_and_deleting_it_lifts_it(registry):
    _production_at_v1_with_policy(registry, {"min": {"accuracy": 0.8}}, {})
    push(registry, 2, {"accuracy": 0.5})
    assert promote(registry, "staging", 2, None).status_code == 200  # no policy on staging
    assert promote(registry, "production", 2, 1).status_code == 403
    registry.client.delete(f"/api/v1/repos/{REPO}/aliases/production/policy")
    assert promote(registry, "production", 2, 1).status_code == 200


def test_a_stale_expectation_is_a_conflict_not_a_policy_verdict(registry):
    """The policy is judged against the holder the move swaps from; a move expecting another holder is
    refused as stale before anything is judged."""
    policy = {"no_regression": [{"metric": "accuracy", "tolerance": 0.0}]}
    _production_at_v1_with_policy(registry, policy, {"accuracy": 0.5})
    push(registry, 2, {"accuracy": 0.9})
    push(registry, 3, {"accuracy": 0.6})  # passes against 1, regresses against 2
    assert promote(registry, "production", 2, 1).status_code == 200
    stale = promote(registry, "production", 3, 1)
    assert (stale.status_code, stale.json()["error"]) == (409, "conflict")
    current = promote(registry, "production", 3, 2)
    assert current.status_code == 403
    assert "accuracy 0.6 regresses from 0.9 held by version 2" in current.json()["detail"]
    assert holder(registry, "production") == 2


# ---- approvals ------------------------------------------------------------------------------------


def test_approvals_are_refused_for_the_pusher_and_for_anonymous(registry):
    push(registry, 0, {}, by="alice")
    own = approve(registry, 1, "production", by="alice")
    assert (own.status_code, own.json()["error"]) == (403, "permission_denied")
    assert "alice pushed acme/bot:1 and cannot approve it" in own.json()["detail"]
    nobody = approve(registry, 1, "production", by=None)
    assert (nobody.status_code, nobody.json()["error"]) == (401, "authentication_required")
    assert "needs an API token with the 'promote' scope" in nobody.json()["detail"]
    assert count(registry.settings, "approvals") == 0
    # Without a token the request never reaches the route: only the pusher's refusal is audited.
    assert actions(registry) == ["push", "approve.refused"]


def test_approving_twice_is_idempotent(registry):
    push(registry, 0, {}, by="alice")
    first = approve(registry, 1, "production", by="bob", comment="looks good")
    assert first.status_code == 201, first.text
    assert {k: first.json()[k] for k in ("repo", "version", "alias", "actor", "comment", "created")} == {
        "repo": REPO,
        "version": 1,
        "alias": "production",
        "actor": "bob",
        "comment": "looks good",
        "created": True,
    }
    again = approve(registry, 1, "production", by="bob", comment="still good")
    assert (again.status_code, again.json()["created"], again.json()["comment"]) == (200, False, "looks good")
    assert count(registry.settings, "approvals") == 1
    assert actions(registry) == ["push", "approve"]
    entry = audit(registry)[-1]
    assert (entry["actor"], entry["target"], entry["details"]["alias"]) == ("bob", f"{REPO}:1", "production")

    listed = registry.client.get(f"/api/v1/repos/{REPO}/versions/1/approvals").json()
    assert [(a["actor"], a["alias"]) for a in listed["approvals"]] == [("bob", "production")]


def test_approvals_count_for_their_alias_only(registry):
    _production_at_v1_with_policy(registry, {"approvals": 1}, {})
    push(registry, 2, {})
    assert approve(registry, 2, "staging", by="bob").status_code == 201
    refused = promote(registry, "production", 2, 1)
    assert "0 of 1 approvals for production" in refused.json()["detail"]
    assert approve(registry, 2, "production", by="bob").status_code == 201
    assert promote(registry, "production", 2, 1).status_code == 200
    by_alias = registry.client.get(f"/api/v1/repos/{REPO}/versions/2/approvals", params={"alias": "staging"})
    assert [a["alias"] for a in by_alias.json()["approvals"]] == ["staging"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("versions/9/approvals", {"alias": "production"}, 404, "version_not_found"),
        ("versions/1/approvals", {"alias": "Production"}, 400, "invalid_input"),
        ("versions/1/approvals", {}, 400, "invalid_input"),
        ("versions/1/approvals", {"alias": "production", "comment": "x" * 1001}, 400, "invalid_input"),
        ("versions/1/approvals", {"alias": "production", "extra": 1}, 400, "invalid_input"),
    ],
)
def test_bad_approvals_are_refused(registry, path, body, status, code):
    push(registry, 0, {}, by="alice")
    response = registry.client.post(f"/api/v1/repos/{REPO}/{path}", json=body, headers=registry.act_as("bob"))
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert count(registry.settings, "approvals") == 0
