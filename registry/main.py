"""The registry application: ``create_app(settings)`` wires settings, database, store and routes."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse

from deltareg.registry.aliases.routes import router as aliases_router
from deltareg.registry.audit.routes import router as audit_router
from deltareg.registry.auth.routes import router as auth_router
from deltareg.registry.auth.rules import authorize
from deltareg.registry.blobs.routes import router as blobs_router
from deltareg.registry.config import Settings
from deltareg.registry.db import Database
from deltareg.registry.deps import refuse_nul_in_query
from deltareg.registry.errors import add_exception_handlers
from deltareg.registry.evals.routes import router as evals_router
from deltareg.registry.gc.task import periodic_gc
from deltareg.registry.history.routes import router as history_router
from deltareg.registry.lineage.routes import router as lineage_router
from deltareg.registry.migrate import check_schema, upgrade
from deltareg.registry.observability.metrics import Metrics, metrics_endpoint
from deltareg.registry.observability.middleware import RequestObservability
from deltareg.registry.policies.routes import router as policies_router
from deltareg.registry.results.routes import router as results_router
from deltareg.registry.search.routes import router as search_router
from deltareg.registry.signing.routes import router as signing_router
from deltareg.registry.storage import open_store
from deltareg.registry.ui.routes import mount_ui
from deltareg.registry.versions.fast_path import ResolveFastPath
from deltareg.registry.versions.reads import RenderedVersions, VersionReads
from deltareg.registry.versions.routes import router as versions_router
from deltareg.registry.webhooks.routes import router as webhooks_router
from deltareg.registry.webhooks.task import delivering_webhooks


def create_app(settings: Settings | None = None) -> FastAPI:
    """A registry app for ``settings`` (default: from DELTAREG_* variables).

    The store is opened here (for S3: the boto3 client, no traffic yet), so a bad DELTAREG_STORAGE_URL
    fails at once. The database is migrated at startup when ``auto_migrate`` is on; otherwise its schema
    must already be current, or this raises SchemaNotReady naming the command to run.
    """
    settings = settings or Settings()
    store = open_store(settings.storage_url, settings)
    if not settings.auto_migrate:
        check_schema(settings.database_url)
    database = Database.connect(settings.database_url)
    metrics = Metrics()  # per app: several apps may live in one process

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await anyio.to_thread.run_sync(upgrade, settings.database_url)
        # What startup built lives as long as the app: kept out of the cyclic garbage collector, whose
        # full collections would otherwise walk all of it (tens of ms on the event loop each time).
        gc.freeze()
        try:
            # DELTAREG_GC_INTERVAL_SECONDS; off by default
            async with periodic_gc(database, store, on_report=metrics.gc_ran):
                async with delivering_webhooks(database):  # DELTAREG_WEBHOOK_*; on every replica
                    yield
        finally:
            database.dispose()
            gc.unfreeze()  # collectable again (tests run many apps in one process)

    app = FastAPI(
        title="deltareg registry",
        version="0.1.0",
        lifespan=lifespan,
        # authorize first: a caller without the right token learns nothing about the request's content.
        dependencies=[Depends(authorize), Depends(refuse_nul_in_query)],
    )
    app.state.settings = settings
    app.state.database = database
    app.state.store = store
    app.state.metrics = metrics
    app.state.version_reads = VersionReads(database, store, RenderedVersions(settings.version_cache_bytes))
    # Innermost, so the middlewares below wrap its answers too (see its module).
    app.add_middleware(ResolveFastPath)
    add_exception_handlers(app)
    # Added after CatchUnhandled, so it wraps it: a 500 carries the request id and is timed too.
    app.add_middleware(RequestObservability, metrics=metrics)
    # Routes are matched in the order included: the versions router first, for GET /resolve, the
    # registry's hottest request (no two routers' paths overlap, so the order changes nothing else).
    app.include_router(versions_router)
    app.include_router(auth_router)
    app.include_router(blobs_router)
    app.include_router(aliases_router)
    app.include_router(audit_router)
    app.include_router(evals_router)
    app.include_router(search_router)
    app.include_router(history_router)
    app.include_router(lineage_router)
    app.include_router(policies_router)
    app.include_router(results_router)
    app.include_router(signing_router)
    app.include_router(webhooks_router)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["health"])
    mount_ui(app)  # last: it wraps the error handlers above to answer /ui paths with HTML
    app.add_api_route(
        "/metrics", metrics_endpoint, methods=["GET"], tags=["health"], response_class=PlainTextResponse
    )
    return app


async def healthz() -> dict[str, str]:
    """Liveness check (async: no hop to the thread pool for a probe that touches nothing)."""
    return {"status": "ok"}


def readyz(request: Request) -> dict[str, str]:
    """Readiness check: the database answers with the current schema and the blob store is usable.

    503 ``service_unavailable`` naming the problem otherwise (sync: runs in the thread pool).
    """
    settings: Settings = request.app.state.settings
    check_schema(settings.database_url, request.app.state.database.engine)
    request.app.state.store.check()
    return {"status": "ready"}
