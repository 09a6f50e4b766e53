"""Signing through the API: keys registered per namespace (``/api/v1/namespaces/{ns}/keys``), signatures
of versions verified by the registry before they are stored (``.../versions/{n}/signatures``), every write
and refusal audited, and a policy's ``require_signature`` met only by a key that is not revoked."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from _support.database import sql

from deltareg.client.signing import SigningKey, generate_key

pytestmark = pytest.mark.backends("fs")  # SQLite and PostgreSQL

NAMESPACE = "acme"
REPO = "acme/signed"


@pytest.fixture
def key(tmp_path) -> SigningKey:
    return generate_key(tmp_path / "release.key", comment="release bot")


@pytest.fixture
def other_key(tmp_path) -> SigningKey:
    return generate_key(tmp_path / "other.key")


@pytest.fixture
def pushed(registry: Any) -> dict[str, Any]:
    return registry.push(REPO, registry.lora_files(0))


def alice(registry: Any) -> dict[str, str]:
    return registry.act_as("alice")


def register(registry: Any, public_key: str, name: str | None = None, *, namespace: str = NAMESPACE) -> Any:
    body = {"public_key": public_key, "name": name}
    return registry.client.post(f"/api/v1/namespaces/{namespace}/keys", json=body, headers=alice(registry))


def revoke(registry: Any, key_id: str, *, namespace: str = NAMESPACE) -> Any:
    path = f"/api/v1/namespaces/{namespace}/keys/{key_id}/revoke"
    return registry.client.post(path, headers=alice(registry))


def sign(registry: Any, key_id: str, signature: str, *, number: int = 1, repo: str = REPO) -> Any:
    path = f"/api/v1/repos/{repo}/versions/{number}/signatures"
    return registry.client.post(
        path, json={"key_id": key_id, "signature": signature}, headers=alice(registry)
    )


def listed(registry: Any, number: int = 1) -> list[dict[str, Any]]:
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/{number}/signatures")
    assert response.status_code == 200, response.text
    signatures: list[dict[str, Any]] = response.json()["signatures"]
    return signatures


def keys(registry: Any, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    response = registry.client.get(f"/api/v1/namespaces/{namespace}/keys")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["keys"]
    return found


def audit(registry: Any) -> list[dict[str, Any]]:
    """Every audit entry, newest first."""
    response = registry.client.get("/api/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def stored_signatures(registry: Any) -> list[tuple[Any, ...]]:
    return sql(registry.settings, "SELECT version_id, key_id, signature, actor FROM signatures")


def assert_refused(registry: Any, before: list[dict[str, Any]], action: str, error: str) -> dict[str, Any]:
    """Exactly one new audit entry, an ``<action>.refused`` one by alice with ``error``; returned."""
    after = audit(registry)
    assert len(after) == len(before) + 1
    refused = after[0]
    assert (refused["action"], refused["actor"]) == (f"{action}.refused", "alice")
    assert refused["details"]["error"] == error
    return refused


# ---- keys ----------------------------------------------------------------------------------------


def test_a_key_is_registered_once_listed_and_audited(registry, key):
    before = audit(registry)
    response = register(registry, key.public.base64, "release")
    assert response.status_code == 201, response.text
    body = response.json()
    assert {k: body[k] for k in ("namespace", "key_id", "public_key", "name", "actor", "created")} == {
        "namespace": NAMESPACE,
        "key_id": key.key_id,
        "public_key": key.public.base64,
        "name": "release",
        "actor": "alice",
        "created": True,
    }
    assert body["revoked_at"] is None
    entry = audit(registry)[0]
    assert (entry["action"], entry["target"], entry["repo"]) == (
        "key.register",
        f"{NAMESPACE}/keys/{key.key_id}",
        None,
    )
    assert entry["details"]["public_key"] == key.public.base64

    again = register(registry, key.public.line(), "another name")  # the one-line form is accepted too
    assert again.status_code == 200, again.text
    assert (again.json()["created"], again.json()["name"]) == (False, "release")
    assert len(audit(registry)) == len(before) + 1  # nothing audited the second time
    assert [(k["key_id"], k["name"]) for k in keys(registry)] == [(key.key_id, "release")]
    assert keys(registry, "elsewhere") == []


def test_the_key_comment_is_the_default_name(registry, key):
    response = register(registry, key.public.line())
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "release bot"


@pytest.mark.parametrize(
    ("public_key", "problem"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"k" * 31).decode(), "exactly 32 bytes"),
        ("ssh-rsa AAAA", "not valid base64"),
        ("x" * 300, "at most"),
    ],
)
def test_a_malformed_key_is_refused_and_audited(registry, public_key, problem):
    before = audit(registry)
    response = register(registry, public_key)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert problem in response.json()["detail"]
    assert_refused(registry, before, "key.register", "invalid_input")
    assert keys(registry) == []


def test_a_key_in_an_invalid_namespace_is_refused(registry, key):
    response = register(registry, key.public.base64, namespace="Not_Valid")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_name"


def test_a_key_is_revoked_once_and_cannot_come_back(registry, key):
    assert register(registry, key.public.base64).status_code == 201
    before = audit(registry)
    response = revoke(registry, key.key_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["changed"], body["revoked_by"]) == (True, "alice") and body["revoked_at"] is not None
    entry = audit(registry)[0]
    assert (entry["action"], entry["target"]) == ("key.revoke", f"{NAMESPACE}/keys/{key.key_id}")

    again = revoke(registry, key.key_id)
    assert again.status_code == 200 and again.json()["changed"] is False
    assert len(audit(registry)) == len(before) + 1

    back = register(registry, key.public.base64)
    assert back.status_code == 409, back.text
    assert "revoked" in back.json()["detail"]
    assert keys(registry)[0]["revoked_at"] is not None


def test_revoking_an_unknown_key_is_404_and_audited(registry, key):
    before = audit(registry)
    response = revoke(registry, key.key_id)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "signing_key_not_found"
    assert_refused(registry, before, "key.revoke", "signing_key_not_found")
    assert revoke(registry, "ed25519:nothex").status_code == 400


# ---- signatures ----------------------------------------------------------------------------------


def test_a_valid_signature_is_stored_listed_and_audited(registry, key, pushed):
    assert register(registry, key.public.base64).status_code == 201
    signature = key.sign(pushed["digest"])
    before = audit(registry)
    response = sign(registry, key.key_id, signature)
    assert response.status_code == 201, response.text
    body = response.json()
    assert {k: v for k, v in body.items() if k != "created_at"} == {
        "repo": REPO,
        "number": 1,
        "digest": pushed["digest"],
        "key_id": key.key_id,
        "signature": signature,
        "actor": "alice",
        "key_revoked": False,
        "created": True,
    }
    entry = audit(registry)[0]
    assert (entry["action"], entry["target"], entry["repo"]) == ("version.sign", f"{REPO}:1", REPO)
    assert entry["details"] == {"version": 1, "digest": pushed["digest"], "key_id": key.key_id}

    again = sign(registry, key.key_id, signature)
    assert again.status_code == 200 and again.json()["created"] is False
    assert len(audit(registry)) == len(before) + 1
    assert [(s["key_id"], s["signature"], s["key_revoked"]) for s in listed(registry)] == [
        (key.key_id, signature, False)
    ]

    assert revoke(registry, key.key_id).status_code == 200
    assert listed(registry)[0]["key_revoked"] is True  # still listed, marked


def test_a_signature_that_does_not_verify_is_refused_and_nothing_is_stored(registry, key, other_key, pushed):
    assert register(registry, key.public.base64).status_code == 201
    other_digest = registry.push(REPO, registry.lora_files(1))["digest"]
    flipped = bytearray(base64.b64decode(key.sign(pushed["digest"])))
    flipped[0] ^= 0x80
    wrong = {
        "another version's": key.sign(other_digest),
        "a flipped byte's": base64.b64encode(bytes(flipped)).decode(),
        "another key's": other_key.sign(pushed["digest"]),
    }
    for what, signature in wrong.items():
        before = audit(registry)
        response = sign(registry, key.key_id, signature)
        assert response.status_code == 400, (what, response.text)
        assert response.json()["error"] == "signature_invalid"
        assert "nothing was stored" in response.json()["detail"]
        refused = assert_refused(registry, before, "version.sign", "signature_invalid")
        assert (refused["repo"], refused["details"]["key_id"]) == (REPO, key.key_id)
    assert stored_signatures(registry) == []
    assert listed(registry) == []


@pytest.mark.parametrize(
    ("signature", "problem"),
    [("not base64!", "not valid base64"), (base64.b64encode(b"s" * 63).decode(), "exactly 64 bytes")],
)
def test_a_malformed_signature_is_refused(registry, key, pushed, signature, problem):
    assert register(registry, key.public.base64).status_code == 201
    before = audit(registry)
    response = sign(registry, key.key_id, signature)
    assert response.status_code == 400, response.text
    assert problem in response.json()["detail"]
    assert_refused(registry, before, "version.sign", "invalid_input")
    assert stored_signatures(registry) == []


def test_an_unknown_or_revoked_key_cannot_sign(registry, key, other_key, pushed):
    before = audit(registry)
    unknown = sign(registry, key.key_id, key.sign(pushed["digest"]))
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"] == "signing_key_not_found"
    assert_refused(registry, before, "version.sign", "signing_key_not_found")

    # A key of another namespace does not count for this one.
    assert register(registry, other_key.public.base64, namespace="elsewhere").status_code == 201
    assert sign(registry, other_key.key_id, other_key.sign(pushed["digest"])).status_code == 404

    assert register(registry, key.public.base64).status_code == 201
    assert revoke(registry, key.key_id).status_code == 200
    before = audit(registry)
    revoked = sign(registry, key.key_id, key.sign(pushed["digest"]))
    assert revoked.status_code == 400, revoked.text
    assert "revoked" in revoked.json()["detail"]
    assert_refused(registry, before, "version.sign", "invalid_input")
    assert stored_signatures(registry) == []


def test_signing_a_missing_version_is_404(registry, key, pushed):
    assert register(registry, key.public.base64).status_code == 201
    response = sign(registry, key.key_id, key.sign(pushed["digest"]), number=7)
    assert response.status_code == 404 and response.json()["error"] == "version_not_found"
    assert registry.client.get(f"/api/v1/repos/{REPO}/versions/7/signatures").status_code == 404


# ---- promotion policy ----------------------------------------------------------------------------


def promote(registry: Any, number: int, expected: int | None) -> Any:
    body = {"version": number, "expected": expected}
    return registry.client.put(f"/api/v1/repos/{REPO}/aliases/production", json=body, headers=alice(registry))


def test_require_signature_is_met_by_a_key_that_is_not_revoked(registry, key, pushed):
    policy = registry.client.put(
        f"/api/v1/repos/{REPO}/aliases/production/policy",
        json={"require_signature": True},
        headers=alice(registry),
    )
    assert policy.status_code == 200, policy.text
    unsigned = promote(registry, 1, None)
    assert unsigned.status_code == 403, unsigned.text
    assert (
        "signature required: version 1 has no signature by a key of the namespace that is not revoked"
        in unsigned.json()["detail"]
    )

    assert register(registry, key.public.base64).status_code == 201
    assert sign(registry, key.key_id, key.sign(pushed["digest"])).status_code == 201
    assert promote(registry, 1, None).status_code == 200

    second = registry.push(REPO, registry.lora_files(1))
    assert sign(registry, key.key_id, key.sign(second["digest"]), number=2).status_code == 201
    assert revoke(registry, key.key_id).status_code == 200
    refused = promote(registry, 2, 1)
    assert refused.status_code == 403, refused.text
    assert "version 2 has no signature by a key of the namespace" in refused.json()["detail"]
    holder = registry.client.get(f"/api/v1/repos/{REPO}/aliases/production")
    assert holder.json()["version"] == 1
