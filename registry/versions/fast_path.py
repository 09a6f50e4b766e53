"""``GET /api/v1/resolve`` answered beneath FastAPI when its answer is already rendered.

Resolve is the registry's hottest request: every production pull starts with it. In its common case (a
token this process knows, a version whose JSON is cached and current) the work of the answer is one
indexed query, and FastAPI's route matching, dependency solving and response handling cost more than
that (bench/bench_metadata.py; BENCHMARKS.md, "Metadata API vs MLflow"). This middleware answers exactly
that case itself, with the route's authorization rule (auth.rules.refusal_of) and the route's bytes
(VersionReads.cached_json). Every other request, including every one that would fail, goes on to the
FastAPI route unchanged, which answers it with its usual checks and errors and fills the cache.

It is the innermost middleware: request ids, the access line, the metrics and the 500 handler apply to
its answers as to the route's.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from deltareg.client.errors import DeltaregError
from deltareg.client.refs import Reference
from deltareg.registry.auth.principal import known_principal
from deltareg.registry.auth.rules import RULES, refusal_of
from deltareg.registry.observability.metrics import metrics_of
from deltareg.registry.versions.reads import VersionReads
from deltareg.registry.versions.routes import router

RESOLVE_PATH = "/api/v1/resolve"
MAX_REF_LENGTH = 512  # the route's Query(max_length=512)
_RULE = RULES[("GET", RESOLVE_PATH)]


class ResolveFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.route = _resolve_route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == RESOLVE_PATH:
            body = await self._cached_answer(scope)
            if body is not None:
                await self._answer(scope, send, body)
                return
        await self.app(scope, receive, send)

    async def _cached_answer(self, scope: Scope) -> bytes | None:
        """The route's 200 body for this request if it is in memory and current, else None."""
        request = Request(scope)
        ref = _plain_ref(request.query_params)  # parsed once: refusal_of reads it again
        if ref is None:
            return None
        try:
            principal = known_principal(request)
            if principal is None or refusal_of(principal, _RULE, request, RESOLVE_PATH) is not None:
                return None
            reads: VersionReads = request.app.state.version_reads
            return await reads.cached_json(Reference.parse(ref))
        except (DeltaregError, SQLAlchemyError):
            # A malformed header or reference, or a database error: the route meets it again and
            # answers with the error it deserves (a down database costs that one failed query twice).
            return None

    async def _answer(self, scope: Scope, send: Send, body: bytes) -> None:
        scope["route"] = self.route  # the access line and the latency metric name the route, as usual
        metrics_of(scope["app"]).resolve_cache_hits.inc()
        # The headers Starlette's Response(body, media_type="application/json") sends, in its order.
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _plain_ref(query: QueryParams) -> str | None:
    """The ``ref`` of a query that holds nothing else (and no NUL, within the route's length limit).

    Any other query (``allow_yanked``, a repeated or unknown parameter) is the route's to interpret.
    """
    items = query.multi_items()
    if len(items) != 1 or items[0][0] != "ref":
        return None
    ref = items[0][1]
    return ref if ref and len(ref) <= MAX_REF_LENGTH and "\x00" not in ref else None


def _resolve_route() -> APIRoute:
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == RESOLVE_PATH and "GET" in (route.methods or ()):
            return route
    raise LookupError(f"the versions router has no GET {RESOLVE_PATH}")
