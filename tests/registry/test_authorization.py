"""The authorization matrix: every route of the app x every kind of caller -> the expected answer.

The expectations are written out here, independently of registry/auth/rules.py, and the test walks the
routes of the app itself: a new route with no line in EXPECTED fails it (and the server refuses the route
to everyone until rules.py has it too).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _support.auth import TEST_TOKEN, bearer, create_token
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from deltareg.registry.auth.principal import hash_token
from deltareg.registry.auth.repository import TokenRepository
from deltareg.registry.config import Settings
from deltareg.registry.db import make_engine
from deltareg.registry.main import create_app
from deltareg.registry.models import utcnow

V = "/api/v1/repos/{namespace}/{name}/versions/{number}"
A = "/api/v1/repos/{namespace}/{name}/aliases/{alias}"
K = "/api/v1/namespaces/{namespace}/keys"
UI = "/ui/repos/{namespace}/{name}"
# (method, path) -> (the scope it needs or None for public, whether it acts on a namespace)
EXPECTED: dict[tuple[str, str], tuple[str | None, bool]] = {
    ("GET", "/healthz"): (None, False),
    ("GET", "/readyz"): (None, False),
    ("GET", "/metrics"): (None, False),
    ("GET", "/api/v1/whoami"): (None, False),
    ("POST", "/api/v1/tokens"): ("admin", False),
    ("GET", "/api/v1/tokens"): ("admin", False),
    ("POST", "/api/v1/tokens/{token_id}/revoke"): ("admin", False),
    ("POST", "/api/v1/blobs/uploads"): ("write", False),
    ("PUT", "/api/v1/blobs/{digest}"): ("write", False),
    ("POST", "/api/v1/blobs/{digest}/complete"): ("write", False),
    ("POST", "/api/v1/blobs/downloads"): ("read", False),
    ("GET", "/api/v1/blobs/{digest}"): ("read", False),
    ("HEAD", "/api/v1/blobs/{digest}"): ("read", False),
    ("GET", "/api/v1/repos"): ("read", True),
    ("GET", "/api/v1/repos/{namespace}/{name}"): ("read", True),
    ("POST", "/api/v1/repos/{namespace}/{name}/versions"): ("write", True),
    ("GET", V): ("read", True),
    ("GET", "/api/v1/resolve"): ("read", True),
    ("POST", V + "/yank"): ("promote", True),
    ("POST", V + "/evals"): ("write", True),
    ("PUT", V + "/results/{base_dtype}"): ("write", True),
    ("GET", V + "/results"): ("read", True),
    ("POST", V + "/approvals"): ("promote", True),
    ("GET", V + "/approvals"): ("read", True),
    ("POST", V + "/signatures"): ("write", True),
    ("GET", V + "/signatures"): ("read", True),
    ("GET", "/api/v1/versions"): ("read", True),
    ("GET", "/api/v1/lineage"): ("read", True),
    ("GET", "/api/v1/repos/{namespace}/{name}/aliases"): ("read", True),
    ("GET", A): ("read", True),
    ("PUT", A): ("promote", True),
    ("POST", A + "/rollback"): ("promote", True),
    ("GET", A + "/history"): ("read", True),
    ("GET", A + "/at"): ("read", True),
    ("PUT", A + "/policy"): ("admin", True),
    ("GET", A + "/policy"): ("read", True),
    ("DELETE", A + "/policy"): ("admin", True),
    ("GET", "/api/v1/repos/{namespace}/{name}/policies"): ("read", True),
    ("POST", K): ("admin", True),
    ("GET", K): ("read", True),
    ("POST", K + "/{key_id}/revoke"): ("admin", True),
    ("GET", "/api/v1/audit"): ("read", True),
    ("GET", "/api/v1/audit/verify"): ("read", False),
    ("POST", "/api/v1/repos/{namespace}/{name}/webhooks"): ("admin", True),
    ("GET", "/api/v1/repos/{namespace}/{name}/webhooks"): ("admin", True),
    ("DELETE", "/api/v1/repos/{namespace}/{name}/webhooks/{webhook_id}"): ("admin", True),
    ("GET", "/api/v1/repos/{namespace}/{name}/webhooks/{webhook_id}/deliveries"): ("admin", True),
    # the web UI (not in the OpenAPI document; app_routes walks it too)
    ("GET", "/ui"): ("read", True),
    ("GET", "/ui/audit"): ("read", True),
    ("GET", UI): ("read", True),
    ("GET", UI + "/versions/{number}"): ("read", True),
    ("POST", UI + "/promote"): ("promote", True),
    ("POST", UI + "/rollback"): ("promote", True),
    ("POST", UI + "/versions/{number}/yank"): ("promote", True),
    ("POST", UI + "/versions/{number}/approve"): ("promote", True),
    ("GET", "/ui/login"): (None, False),
    ("POST", "/ui/login"): (None, False),
    ("POST", "/ui/logout"): (None, False),
}
PATH_VALUES = {
    "namespace": "acme",
    "name": "bot",
    "number": "1",
    "alias": "production",
    "digest": "sha256:" + "0" * 64,
    "token_id": "999",
    "base_dtype": "BF16",
    "key_id": "ed25519:" + "0" * 32,
    "webhook_id": "999",
}
# Query parameters naming the namespace a registry-wide route acts on.
QUERIES = {
    "/api/v1/repos": {"namespace": "acme"},
    "/api/v1/resolve": {"ref": "acme/bot"},
    "/api/v1/versions": {"repo": "acme/bot"},
    "/api/v1/lineage": {"ref": "acme/bot:1"},
    "/api/v1/audit": {"repo": "acme/bot"},
    "/ui": {"namespace": "acme"},
    "/ui/audit": {"repo": "acme/bot"},
    "/api/v1/repos/{namespace}/{name}/aliases/{alias}/at": {"time": "2026-01-01T00:00:00Z"},
}
SCOPED = {"read": ["read"], "write": ["write"], "promote": ["promote"], "admin": ["admin"]}
AUTH_ERRORS = {"authentication_required", "permission_denied"}


def app_routes(app: Any) -> list[tuple[str, str]]:
    documented = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    hidden = {  # the web UI's pages are left out of the OpenAPI document, not out of authorization
        (method, str(context.path))
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute) and not context.original_route.include_in_schema
        for method in context.original_route.methods
    }
    return sorted(documented | hidden)


def insert_token(
    settings: Settings, name: str, scopes: list[str], namespaces: list[str], **times: Any
) -> str:
    secret = "drg_" + secrets.token_urlsafe(24)
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            token = TokenRepository(session).add(
                name=name,
                token_hash=hash_token(secret),
                scopes=scopes,
                namespaces=namespaces,
                created_by="tests",
                expires_at=times.get("expires_at"),
            )
            token.revoked_at = times.get("revoked_at")
            session.commit()
    finally:
        engine.dispose()
    return secret


@pytest.fixture(scope="module")
def matrix_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app with anonymous reads off (as on any shared server) and one token per kind of caller."""
    data_dir: Path = tmp_path_factory.mktemp("matrix")
    settings = Settings(data_dir=data_dir, anonymous_read=False)
    with TestClient(create_app(settings)) as client:
        tokens = {kind: insert_token(settings, kind, scopes, ["*"]) for kind, scopes in SCOPED.items()}
        tokens["other-namespace"] = insert_token(settings, "other", ["admin"], ["other", "team-*"])
        tokens["expired"] = insert_token(
            settings, "old", ["admin"], ["*"], expires_at=utcnow() - timedelta(1)
        )
        revoked = create_token(client, "gone", ["admin"])
        gone_id = client.get("/api/v1/whoami", headers=bearer(revoked)).json()["token_id"]
        assert client.post(f"/api/v1/tokens/{gone_id}/revoke", headers=bearer(TEST_TOKEN)).status_code == 200
        tokens["revoked"] = revoked
        yield client, tokens


def expected_status(route: tuple[str, str], caller: str) -> str:
    """ "ok" (authorized: whatever the route then answers), "401" or "403"."""
    scope, namespaced = EXPECTED[route]
    if route == ("GET", "/api/v1/whoami") and caller in ("expired", "revoked"):
        return "401"  # public, but it tells a caller that its token is no good
    if scope is None:
        return "ok"
    if caller in ("anonymous", "expired", "revoked"):
        return "401"
    if caller == "other-namespace":
        return "403" if namespaced else "ok"
    allowed = {"read": {"read", "write", "promote", "admin"}, "write": {"write", "admin"}}
    allowed |= {"promote": {"promote", "admin"}, "admin": {"admin"}}
    return "ok" if caller in allowed[scope] else "403"


def call(client: TestClient, route: tuple[str, str], token: str | None) -> Any:
    method, template = route
    path = template.format(**{k: v for k, v in PATH_VALUES.items() if "{" + k + "}" in template})
    headers = bearer(token) if token else {"Authorization": ""}  # "": no token at all
    body = {} if method in ("POST", "PUT") else None
    return client.request(method, path, params=QUERIES.get(template), json=body, headers=headers)


def test_every_route_has_an_expectation(matrix_app):
    client, _ = matrix_app
    missing = [route for route in app_routes(client.app) if route not in EXPECTED]
    assert missing == [], f"routes without an authorization expectation: {missing}"
    assert set(EXPECTED) == set(app_routes(client.app)), "EXPECTED names routes the app does not have"


CALLERS = ["anonymous", "read", "write", "promote", "admin", "other-namespace", "expired", "revoked"]


@pytest.mark.parametrize("caller", CALLERS)
def test_the_authorization_matrix(matrix_app, caller):
    client, tokens = matrix_app
    wrong = []
    for route in app_routes(client.app):
        response = call(client, route, tokens.get(caller))
        is_json = response.headers.get("content-type", "").startswith("application/json")
        error = response.json().get("error") if is_json and route[0] != "HEAD" else None
        got = (
            str(response.status_code) if error in AUTH_ERRORS or response.status_code in (401, 403) else "ok"
        )
        if route[0] == "HEAD" and response.status_code in (401, 403):
            got = str(response.status_code)
        if got != expected_status(route, caller):
            wrong.append(f"{route[0]} {route[1]}: {response.status_code} {response.text[:120]}")
    assert wrong == [], "\n".join(wrong)


def test_registry_wide_listings_need_a_token_for_every_namespace(matrix_app):
    client, tokens = matrix_app
    everything = client.get("/api/v1/audit", headers=bearer(tokens["other-namespace"]))
    assert everything.status_code == 403 and "the whole registry" in everything.json()["detail"]
    team = client.get(
        "/api/v1/repos", params={"namespace": "team-x"}, headers=bearer(tokens["other-namespace"])
    )
    assert team.status_code == 200  # "team-*" covers it


def test_anonymous_reads_when_the_server_allows_them(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", anonymous_read=True)
    with TestClient(create_app(settings)) as client:
        for route in app_routes(client.app):
            scope, _ = EXPECTED[route]
            response = call(client, route, None)
            refused = response.status_code in (401, 403)
            assert refused == (scope not in (None, "read")), (
                route,
                response.status_code,
                response.text[:120],
            )


def test_bad_tokens_are_refused_with_a_clear_reason_and_no_secret(matrix_app):
    client, tokens = matrix_app
    expired = client.get("/api/v1/repos", headers=bearer(tokens["expired"])).json()["detail"]
    assert "'old'" in expired and "expired" in expired and tokens["expired"] not in expired
    revoked = client.get("/api/v1/repos", headers=bearer(tokens["revoked"])).json()["detail"]
    assert "was revoked" in revoked and tokens["revoked"] not in revoked
    unknown = client.get("/api/v1/repos", headers=bearer("drg_" + "x" * 40))
    assert unknown.status_code == 401 and "x" * 40 not in unknown.text
    malformed = client.get("/api/v1/repos", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert malformed.status_code == 401 and "Bearer" in malformed.json()["detail"]
    listed = client.get("/api/v1/tokens", headers=bearer(TEST_TOKEN)).text
    assert all(secret not in listed for secret in tokens.values())
    assert all(hash_token(secret) not in listed for secret in tokens.values())
