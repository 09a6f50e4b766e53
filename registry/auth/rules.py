"""What each route needs: one table, checked by one dependency on every route.

Every route of the app has an entry (method, path template) -> (scope, where its namespace comes from).
A route without an entry is refused (403), whoever calls it: a new route is closed until someone decides
who may call it, and tests/registry/test_authorization.py, which walks every route of the app, fails
until the table has it.

Namespaces: ``path`` reads the ``{namespace}`` path parameter; ``query`` reads the ``namespace``, ``repo``
or ``ref`` query parameter (``ns/name...``), and without one the route is registry-wide (it lists or
searches everything, so it needs a token whose patterns include ``*``); ``none`` is for content-addressed
blob transfers, which belong to no namespace (a version that names a blob is checked when it is pushed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from deltareg.client.errors import AuthenticationRequired, DeltaregError, PermissionDenied
from deltareg.registry.auth.principal import (
    ADMIN,
    PROMOTE,
    READ,
    WRITE,
    Principal,
    authenticate,
    known_principal,
)

NamespaceFrom = Literal["path", "query", "none"]


@dataclass(frozen=True)
class Rule:
    scope: str | None  # None: anyone, no token needed (health checks, whoami)
    namespace: NamespaceFrom = "path"


PUBLIC = Rule(None, "none")
VERSION = "/api/v1/repos/{namespace}/{name}/versions/{number}"
ALIAS = "/api/v1/repos/{namespace}/{name}/aliases/{alias}"
UI_REPO = "/ui/repos/{namespace}/{name}"

RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    # Prometheus scrapes without a token; labels hold route templates, never repo names or tokens.
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/api/v1/whoami"): PUBLIC,
    # tokens
    ("POST", "/api/v1/tokens"): Rule(ADMIN, "none"),
    ("GET", "/api/v1/tokens"): Rule(ADMIN, "none"),
    ("POST", "/api/v1/tokens/{token_id}/revoke"): Rule(ADMIN, "none"),
    # blobs: content-addressed, in no namespace
    ("POST", "/api/v1/blobs/uploads"): Rule(WRITE, "none"),
    ("PUT", "/api/v1/blobs/{digest}"): Rule(WRITE, "none"),
    ("POST", "/api/v1/blobs/{digest}/complete"): Rule(WRITE, "none"),
    ("POST", "/api/v1/blobs/downloads"): Rule(READ, "none"),
    ("GET", "/api/v1/blobs/{digest}"): Rule(READ, "none"),
    ("HEAD", "/api/v1/blobs/{digest}"): Rule(READ, "none"),
    # repos and versions
    ("GET", "/api/v1/repos"): Rule(READ, "query"),
    ("GET", "/api/v1/repos/{namespace}/{name}"): Rule(READ),
    ("POST", "/api/v1/repos/{namespace}/{name}/versions"): Rule(WRITE),
    ("GET", VERSION): Rule(READ),
    ("GET", "/api/v1/resolve"): Rule(READ, "query"),
    ("POST", VERSION + "/yank"): Rule(PROMOTE),
    ("POST", VERSION + "/evals"): Rule(WRITE),
    ("PUT", VERSION + "/results/{base_dtype}"): Rule(WRITE),
    ("GET", VERSION + "/results"): Rule(READ),
    ("POST", VERSION + "/approvals"): Rule(PROMOTE),
    ("GET", VERSION + "/approvals"): Rule(READ),
    ("GET", "/api/v1/versions"): Rule(READ, "query"),
    ("GET", "/api/v1/lineage"): Rule(READ, "query"),
    # aliases, their history and policies
    ("GET", "/api/v1/repos/{namespace}/{name}/aliases"): Rule(READ),
    ("GET", ALIAS): Rule(READ),
    ("PUT", ALIAS): Rule(PROMOTE),
    ("POST", ALIAS + "/rollback"): Rule(PROMOTE),
    ("GET", ALIAS + "/history"): Rule(READ),
    ("GET", ALIAS + "/at"): Rule(READ),
    ("PUT", ALIAS + "/policy"): Rule(ADMIN),
    ("GET", ALIAS + "/policy"): Rule(READ),
    ("DELETE", ALIAS + "/policy"): Rule(ADMIN),
    ("GET", "/api/v1/repos/{namespace}/{name}/policies"): Rule(READ),
    # signing keys (per namespace) and signatures
    ("POST", "/api/v1/namespaces/{namespace}/keys"): Rule(ADMIN),
    ("GET", "/api/v1/namespaces/{namespace}/keys"): Rule(READ),
    ("POST", "/api/v1/namespaces/{namespace}/keys/{key_id}/revoke"): Rule(ADMIN),
    ("POST", VERSION + "/signatures"): Rule(WRITE),
    ("GET", VERSION + "/signatures"): Rule(READ),
    # audit log
    ("GET", "/api/v1/audit"): Rule(READ, "query"),
    ("GET", "/api/v1/audit/verify"): Rule(READ, "none"),
    # webhooks: admin only (URLs may carry a receiver's credentials; secrets are never listed)
    ("POST", "/api/v1/repos/{namespace}/{name}/webhooks"): Rule(ADMIN),
    ("GET", "/api/v1/repos/{namespace}/{name}/webhooks"): Rule(ADMIN),
    ("DELETE", "/api/v1/repos/{namespace}/{name}/webhooks/{webhook_id}"): Rule(ADMIN),
    ("GET", "/api/v1/repos/{namespace}/{name}/webhooks/{webhook_id}/deliveries"): Rule(ADMIN),
    # web UI (registry/ui): each page needs what the API call it shows needs
    ("GET", "/ui"): Rule(READ, "query"),  # as GET /api/v1/repos (?namespace=)
    ("GET", "/ui/audit"): Rule(READ, "query"),  # as GET /api/v1/audit (?repo=)
    ("GET", UI_REPO): Rule(READ),
    ("GET", UI_REPO + "/versions/{number}"): Rule(READ),
    ("POST", UI_REPO + "/promote"): Rule(PROMOTE),
    ("POST", UI_REPO + "/rollback"): Rule(PROMOTE),
    ("POST", UI_REPO + "/versions/{number}/yank"): Rule(PROMOTE),
    ("POST", UI_REPO + "/versions/{number}/approve"): Rule(PROMOTE),
    ("GET", "/ui/login"): PUBLIC,
    ("POST", "/ui/login"): PUBLIC,  # checks the token it is given
    ("POST", "/ui/logout"): PUBLIC,
}


async def authorize(request: Request) -> None:
    """Every route: the caller's token must have the route's scope on the namespace it acts on.

    async, and a token this process saw moments ago is not looked up again (auth.principal): most
    requests are authorized without a query and without a hop to the thread pool.

    Raises:
        AuthenticationRequired: no token (or a bad one) where one is needed (401).
        PermissionDenied: the token lacks the scope or the namespace, or the route has no rule (403).
    """
    route = request.scope.get("route")
    path = route.path if isinstance(route, APIRoute) else request.url.path
    rule = RULES.get((request.method, path))
    if rule is None:
        raise PermissionDenied(f"{request.method} {path} has no authorization rule; nobody may call it")
    if rule.scope is None:
        return  # health checks never look at tokens; whoami reads its own
    principal = known_principal(request)
    if principal is None:  # a token this process has not seen lately: look it up, off the event loop
        principal = await run_in_threadpool(authenticate, request)
    refusal = refusal_of(principal, rule, request, path)
    if refusal is not None:
        raise refusal


def refusal_of(principal: Principal, rule: Rule, request: Request, path: str) -> DeltaregError | None:
    """Why ``principal`` may not make ``request`` on the route ``rule`` guards; None if it may.

    Shared by :func:`authorize` and the resolve fast path (registry/versions/fast_path.py), so that both
    apply the same rules.
    """
    assert rule.scope is not None, "a public route refuses nobody"
    if rule.scope not in principal.scopes:
        return _scope_refusal(principal, rule.scope, request.method, path)
    namespace = _namespace_of(request, rule.namespace)
    if rule.namespace != "none" and not principal.covers(namespace):
        where = f"namespace {namespace!r}" if namespace else "the whole registry (no namespace given)"
        return PermissionDenied(
            f"token {principal.name!r} may act on namespaces {', '.join(principal.namespaces)}, "
            f"not on {where}"
        )
    return None


def _scope_refusal(principal: Principal, scope: str, method: str, path: str) -> DeltaregError:
    if principal.anonymous:
        return AuthenticationRequired(
            f"{method} {path} needs an API token with the {scope!r} scope (DELTAREG_TOKEN or --token)"
        )
    return PermissionDenied(
        f"token {principal.name!r} has the scopes {', '.join(sorted(principal.scopes))}; "
        f"{method} {path} needs {scope!r}"
    )


def _namespace_of(request: Request, source: NamespaceFrom) -> str | None:
    if source == "path":
        return str(request.path_params.get("namespace", "")) or None
    if source == "query":
        query = request.query_params
        for name in ("namespace", "repo", "ref"):
            value = query.get(name)
            if value:
                return value.split("/", 1)[0].split("@", 1)[0].split(":", 1)[0] or None
    return None
