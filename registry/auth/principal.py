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
import time
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
# The web UI keeps a token in this cookie, honoured only under UI_PREFIX (see _ui_session_header).
UI_PREFIX = "/ui"
UI_SESSION_COOKIE = "deltareg_session"
# How long a process trusts a token it looked up without looking again: the bound on a revocation made
# elsewhere (another worker, the database) taking effect here. See PrincipalCache.
PRINCIPAL_CACHE_SECONDS = 2.0


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
    """The request's principal (computed once per request; a token's looked up at most every
    PRINCIPAL_CACHE_SECONDS per process).

    Raises:
        AuthenticationRequired: a malformed header, or an unknown, revoked or expired token (401).
    """
    principal = known_principal(request)
    if principal is None:
        secret = _secret_of(request)
        assert secret is not None  # known_principal answers every request without a token
        settings: Settings = request.app.state.settings
        principal, expires_at = _principal_of(secret, settings, request.app.state.database)
        _principal_cache(request).put(hash_token(secret), principal, expires_at)
        request.state.principal = principal
    return principal


def known_principal(request: Request) -> Principal | None:
    """The request's principal when finding it needs no database read, else None.

    Without a token, with a malformed header (raises), with a token seen by this process in the last
    PRINCIPAL_CACHE_SECONDS: answered here, so the authorization of a busy client costs no query.
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    secret = _secret_of(request)
    if secret is None:
        settings: Settings = request.app.state.settings
        principal = Principal(ANONYMOUS, IMPLIED[READ] if settings.anonymous_read else frozenset(), ("*",))
    else:
        found = _principal_cache(request).get(hash_token(secret))
        if found is None:
            return None
        principal = found
    request.state.principal = principal
    return principal


def forget_principals(request: Request) -> None:
    """Drop this process's remembered tokens (a token was revoked: refuse it from the next request)."""
    _principal_cache(request).clear()


def _secret_of(request: Request) -> str | None:
    """The bearer secret of the request (None: no token at all).

    Raises:
        AuthenticationRequired: the Authorization header is not ``Bearer <token>``.
    """
    header = request.headers.get("authorization", "").strip() or _ui_session_header(request)
    if not header:
        return None
    match = _BEARER.fullmatch(header)
    if match is None:
        raise AuthenticationRequired("the Authorization header must be 'Bearer <token>'")
    return match.group(1)


class PrincipalCache:
    """Principals of recently seen tokens, by token hash, for PRINCIPAL_CACHE_SECONDS.

    A token lookup was one session and one query on every request (bench/bench_metadata.py). The price:
    a token revoked through another worker process, or in the database directly, still works there for
    at most PRINCIPAL_CACHE_SECONDS; a revocation through this process clears it here at once. An
    expiry is checked on every hit. Only good tokens are kept; an unknown one is looked up every time.
    """

    MAX_ENTRIES = 4096  # past this the cache starts again empty: a bound, not an eviction policy

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Principal, float, datetime | None]] = {}

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, stored_at, expires_at = entry
        if time.monotonic() - stored_at > PRINCIPAL_CACHE_SECONDS or (
            expires_at is not None and expires_at <= utcnow()
        ):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, expires_at: datetime | None = None) -> None:
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (principal, time.monotonic(), expires_at)

    def clear(self) -> None:
        self._entries.clear()


def _principal_cache(request: Request) -> PrincipalCache:
    """The app's cache (one per app: tests run several apps in one process)."""
    cache: PrincipalCache | None = getattr(request.app.state, "principal_cache", None)
    if cache is None:
        cache = request.app.state.principal_cache = PrincipalCache()
    return cache


def is_ui_path(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def _ui_session_header(request: Request) -> str:
    """The web UI's session cookie, as a bearer header, on /ui pages only.

    Never on the API: a browser sends cookies with requests other sites make it send, so a cookie must
    not authorize API calls (CSRF). UI forms are checked against a CSRF token instead (registry/ui).
    """
    if not is_ui_path(request.url.path):
        return ""
    secret = request.cookies.get(UI_SESSION_COOKIE, "")
    return f"Bearer {secret}" if secret else ""


def principal_for_secret(request: Request, secret: str) -> Principal:
    """The principal of a token secret (the UI's login checks it before keeping it in a cookie).

    Raises:
        AuthenticationRequired: a malformed, unknown, revoked or expired token.
    """
    if _BEARER.fullmatch(f"Bearer {secret}") is None:
        raise AuthenticationRequired("that is not an API token (deltareg tokens look like drg_...)")
    return _principal_of(secret, request.app.state.settings, request.app.state.database)[0]


def _principal_of(secret: str, settings: Settings, database: Database) -> tuple[Principal, datetime | None]:
    """The principal of a secret and when its token expires (None: never)."""
    digest = hash_token(secret)
    bootstrap = settings.bootstrap_token
    if bootstrap is not None and hmac.compare_digest(digest, hash_token(bootstrap.get_secret_value())):
        return Principal(BOOTSTRAP, IMPLIED[ADMIN], ("*",)), None
    with database.read_sessions() as session:
        token = TokenRepository(session).by_hash(digest)
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise AuthenticationRequired("unknown API token (check DELTAREG_TOKEN or --token)")
    _refuse_unusable(token, utcnow())
    principal = Principal(
        token.name,
        effective_scopes(token.scopes.split(",")),
        tuple(token.namespaces.split(",")),
        token_id=token.id,
    )
    return principal, token.expires_at


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
