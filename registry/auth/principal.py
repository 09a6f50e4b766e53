"""Who is calling: the principal behind a request's ``Authorization: Bearer <token>`` header.

A token has a name (the actor every write it makes records), scopes and namespace patterns. Scopes:
``read``; ``write`` (push, eval, record results; implies read); ``promote`` (alias moves, approvals, yank;
implies read); ``admin`` (tokens, policies, everything). A namespace pattern is a namespace, ``*``, or a
prefix ending in ``*`` (``team-*``).

Only the SHA-256 of a secret is stored and looked up, so the secret itself is never compared (its hash is
compared with ``hmac.compare_digest``), and no timing tells anything about it. Without a header the caller
is ``anonymous``: reads only, and only when the server allows anonymous reads (the embedded default does;
``DELTAREG_ANONYMOUS_READ``). ``DELTAREG_BOOTSTRAP_TOKEN`` is an admin token given to the server itself,
for first set-up and automation; it is not stored, and unsetting it revokes it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase

from fastapi import Request

from deltareg.client.errors import AuthenticationRequired
from deltareg.registry.auth.repository import TokenRepository
from deltareg.registry.config import Settings
from deltareg.registry.db import Database
from deltareg.registry.models import ApiToken, utcnow

READ, WRITE, PROMOTE, ADMIN = "read", "write", "promote", "admin"
SCOPES = (READ, WRITE, PROMOTE, ADMIN)
IMPLIED: dict[str, frozenset[str]] = {
    READ: frozenset({READ}),
    WRITE: frozenset({READ, WRITE}),
    PROMOTE: frozenset({READ, PROMOTE}),
    ADMIN: frozenset(SCOPES),
}
ANONYMOUS = "anonymous"
BOOTSTRAP = "bootstrap"
TOKEN_PREFIX = "drg_"
NAMESPACE_PATTERN = re.compile(r"\*|[a-z0-9][a-z0-9._-]{0,63}\*?")
_BEARER = re.compile(r"Bearer ([A-Za-z0-9_\-]{1,256})")


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]  # effective (implied scopes included)
    namespaces: tuple[str, ...]
    token_id: int | None = None

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS and self.token_id is None

    def covers(self, namespace: str | None) -> bool:
        """Whether the token may act on ``namespace``; None (registry-wide) needs the pattern ``*``."""
        if namespace is None:
            return "*" in self.namespaces
        return any(fnmatchcase(namespace, pattern) for pattern in self.namespaces)


def effective_scopes(granted: set[str] | frozenset[str] | list[str]) -> frozenset[str]:
    return frozenset().union(*(IMPLIED[scope] for scope in granted))


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def authenticate(request: Request) -> Principal:
    """The request's principal (computed once per request).

    Raises:
        AuthenticationRequired: a malformed header, or an unknown, revoked or expired token (401).
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization", "").strip()
    if not header:
        principal = Principal(ANONYMOUS, IMPLIED[READ] if settings.anonymous_read else frozenset(), ("*",))
    else:
        match = _BEARER.fullmatch(header)
        if match is None:
            raise AuthenticationRequired("the Authorization header must be 'Bearer <token>'")
        principal = _principal_of(match.group(1), settings, request.app.state.database)
    request.state.principal = principal
    return principal


def _principal_of(secret: str, settings: Settings, database: Database) -> Principal:
    digest = hash_token(secret)
    bootstrap = settings.bootstrap_token
    if bootstrap is not None and hmac.compare_digest(digest, hash_token(bootstrap.get_secret_value())):
        return Principal(BOOTSTRAP, IMPLIED[ADMIN], ("*",))
    with database.read_sessions() as session:
        token = TokenRepository(session).by_hash(digest)
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise AuthenticationRequired("unknown API token (check DELTAREG_TOKEN or --token)")
    _refuse_unusable(token, utcnow())
    return Principal(
        token.name,
        effective_scopes(token.scopes.split(",")),
        tuple(token.namespaces.split(",")),
        token_id=token.id,
    )


def _refuse_unusable(token: ApiToken, now: datetime) -> None:
    if token.revoked_at is not None:
        raise AuthenticationRequired(
            f"API token {token.name!r} (id {token.id}) was revoked; ask for a new one"
        )
    if token.expires_at is not None and token.expires_at <= now:
        raise AuthenticationRequired(
            f"API token {token.name!r} (id {token.id}) expired at {token.expires_at.isoformat()}; "
            "ask for a new one"
        )
