"""Every error leaves the server as ``{"error": <stable code>, "detail": <message>}``.

The hierarchy (codes and statuses) is ``deltareg.client.errors``; this module only renders it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltareg.client.errors import DeltaregError, InvalidInput, NotFound, PolicyViolation
from deltareg.registry.body import describe_errors
from deltareg.registry.db import unavailable_error
from deltareg.registry.observability.logs import current_request_id
from deltareg.registry.observability.metrics import metrics_of

logger = logging.getLogger("deltareg.registry")


def error_response(error: DeltaregError, status_code: int | None = None) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=status_code or error.status_code)


async def _deltareg_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DeltaregError)
    if isinstance(exc, PolicyViolation):  # counted where every refusal is answered, whichever route
        metrics_of(request.app).policy_refusals.inc()
    if exc.status_code == 503:
        logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return error_response(exc)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # The database is down or unreachable: a 503 naming why. Anything else is a bug: re-raised, so that
    # CatchUnhandled logs it and answers a generic 500.
    unavailable = unavailable_error(exc, request.app.state.settings.database_url)
    if unavailable is None:
        raise exc
    logger.warning("%s %s: %s", request.method, request.url.path, unavailable.message)
    return error_response(unavailable)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(InvalidInput(f"invalid request: {describe_errors(exc.errors())}"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised by the framework itself: unknown routes (404) and wrong methods (405).
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.url.path}"))
    if exc.status_code == 405:
        error = InvalidInput(f"method {request.method} is not allowed on {request.url.path}")
        return error_response(error, status_code=405)
    return error_response(InvalidInput(str(exc.detail)), status_code=exc.status_code)


def add_exception_handlers(app: FastAPI) -> None:
    """Render known errors; anything unexpected becomes a generic 500 (see CatchUnhandled)."""
    app.add_exception_handler(DeltaregError, _deltareg_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchUnhandled)


class CatchUnhandled:
    """Turn an unexpected exception into a 500 ``internal_error`` without leaking internals.

    The traceback goes to the log, once, here (rather than through Starlette's error middleware,
    which would re-raise it to the server to be logged again).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise  # too late for a clean answer; let the server drop the connection
            # The request id lets the operator find the traceback of this very request in the log.
            request_id = current_request_id.get()
            body = DeltaregError(
                f"internal server error; the server log has the details (request id {request_id})"
            )
            await error_response(body)(scope, receive, send)
