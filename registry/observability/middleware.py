"""One pure ASGI middleware per app: the request id, the latency histogram and the access line.

Pure ASGI (not BaseHTTPMiddleware) so that streamed blob bodies pass through untouched and the request
id's context variable is set in the same context the routes (and their worker threads) run in.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltareg.registry.observability.logs import current_request_id, request_id_from
from deltareg.registry.observability.metrics import UNMATCHED, Metrics

REQUEST_ID_HEADER = "X-Request-ID"
access_logger = logging.getLogger("deltareg.access")


class RequestObservability:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope).get(REQUEST_ID_HEADER))
        token = current_request_id.set(request_id)
        status = 500  # what the server answers when the app raises before it starts a response
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            self._record(scope["method"], route_template(scope), status, seconds)
            current_request_id.reset(token)

    def _record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.metrics.observe_request(method, route, status, seconds)
        duration_ms = round(seconds * 1000, 1)
        # Never the raw path or query string (they may hold names or secrets): the route template only.
        access_logger.info(
            '"%s %s" %d %.1f ms',
            method,
            route,
            status,
            duration_ms,
            extra={"method": method, "route": route, "status": status, "duration_ms": duration_ms},
        )


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (set in the scope by the router), or "<unmatched>"."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED
