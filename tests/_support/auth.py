"""API tokens for tests.

Every server a test starts accepts TEST_TOKEN as its bootstrap admin token (DELTAREG_BOOTSTRAP_TOKEN, set
for the whole session by tests/conftest.py), and every client sends it (DELTAREG_TOKEN) unless told
otherwise. A test acting as a named person uses a real token of that name: ``act_as`` puts one in the
test's database with the registry's own TokenRepository (test set-up, so it leaves no audit entry that
the test did not make), ``create_token`` creates one through the API, as an admin would.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Sequence
from typing import Any

import httpx

TEST_TOKEN = "deltareg-test-bootstrap-token"
# app -> name -> secret: a test's databases are emptied between tests, its apps are not reused.
_BY_APP: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def act_as(client: Any, name: str) -> dict[str, str]:
    """Headers of a request by ``name`` to the app of ``client`` (a TestClient): an admin token of that
    name in the app's database, made once per app."""
    tokens = _BY_APP.setdefault(client.app, {})
    if name not in tokens:
        tokens[name] = token_in_database(client.app.state.settings.database_url, name)
    return bearer(tokens[name])


def token_in_database(database_url: str, name: str, scopes: Sequence[str] = ("admin",)) -> str:
    """The secret of an unexpiring token ``name`` with ``scopes`` on all namespaces, inserted directly."""
    from sqlalchemy.orm import Session

    from deltareg.registry.auth.principal import hash_token
    from deltareg.registry.auth.repository import TokenRepository
    from deltareg.registry.db import make_engine

    secret = "drg_test_" + secrets.token_urlsafe(16)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            TokenRepository(session).add(
                name=name,
                token_hash=hash_token(secret),
                scopes=list(scopes),
                namespaces=["*"],
                created_by="tests",
                expires_at=None,
            )
            session.commit()
    finally:
        engine.dispose()
    return secret


def create_token(
    client: Any,
    name: str,
    scopes: Sequence[str] = ("admin",),
    namespaces: Sequence[str] = ("*",),
    *,
    admin_token: str = TEST_TOKEN,
    expires_in_days: int | None = 1,
) -> str:
    """A new token's secret, created through the API with ``admin_token`` (``client``: a TestClient, or a
    registry URL)."""
    body = {
        "name": name,
        "scopes": list(scopes),
        "namespaces": list(namespaces),
        "expires_in_days": expires_in_days,
    }
    if isinstance(client, str):
        response = httpx.post(f"{client}/api/v1/tokens", json=body, headers=bearer(admin_token), timeout=30)
    else:
        response = client.post("/api/v1/tokens", json=body, headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    secret: str = response.json()["token"]
    return secret
