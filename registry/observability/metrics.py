"""The registry's Prometheus metrics, one CollectorRegistry per app (several apps share a test process).

Labels carry only route templates, methods, status codes and fixed words: never a repo name, a token or a
raw path, so ``/metrics`` can be public and the number of series stays bounded.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import Depends, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from sqlalchemy import event
from sqlalchemy.orm import Session

from deltareg.registry.deps import SessionDep
from deltareg.registry.gc.service import GcReport

# Blob transfers through the registry can take minutes: the default buckets stop at 10 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNMATCHED = "<unmatched>"


class Metrics:
    """Every metric of one app, registered in the app's own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "deltareg_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status code.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.pushes = self._counter("deltareg_pushes_total", "Versions committed by pushes.")
        self.pulls = self._counter(
            "deltareg_pulls_total", "Blob downloads handed out: one per blob in an answered download plan."
        )
        self.blob_bytes = Counter(
            "deltareg_blob_bytes_total",
            "Blob bytes uploaded (recorded after the server verified them) or planned for download.",
            ["direction"],
            registry=self.registry,
        )
        self.policy_refusals = self._counter(
            "deltareg_policy_refusals_total", "Alias moves refused by a promotion policy."
        )
        self.resolve_cache_hits = self._counter(
            "deltareg_resolve_cache_hits_total",
            "Resolves answered from the rendered-version cache (registry/versions/fast_path.py).",
        )
        self.gc_runs = self._counter("deltareg_gc_runs_total", "Garbage collections run by this server.")
        self.gc_blobs_removed = self._counter(
            "deltareg_gc_blobs_removed_total", "Blobs and stray store objects removed by garbage collection."
        )
        self.gc_bytes_removed = self._counter(
            "deltareg_gc_bytes_removed_total", "Bytes that garbage collection removed."
        )
        build = Info("deltareg_build", "The running deltareg server.", registry=self.registry)
        build.info({"version": _deltareg_version(), "python": platform.python_version()})

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, registry=self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(method=method, route=route, status=str(status)).observe(seconds)

    def uploaded(self, size: int) -> None:
        self.blob_bytes.labels(direction="upload").inc(size)

    def planned_downloads(self, sizes: list[int]) -> None:
        self.pulls.inc(len(sizes))
        self.blob_bytes.labels(direction="download").inc(sum(sizes))

    def gc_ran(self, report: GcReport) -> None:
        """Count a finished collection (a dry run removed nothing, so it adds no blobs or bytes)."""
        self.gc_runs.inc()
        if not report.dry_run:
            self.gc_blobs_removed.inc(len(report.blobs) + len(report.strays))
            self.gc_bytes_removed.inc(report.removed_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _deltareg_version() -> str:
    try:
        return version("deltareg")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def metrics_of(app: object) -> Metrics:
    """The metrics of an app made by ``create_app``."""
    metrics: Metrics = app.state.metrics  # type: ignore[attr-defined]
    return metrics


class CommitCounts:
    """Counts a route adds once the request's transaction commits: a refused or rolled-back write
    (the session is rolled back, never committed) counts nothing."""

    def __init__(self, metrics: Metrics, session: Session) -> None:
        self.metrics = metrics
        self.session = session

    def on_commit(self, count: Callable[[Metrics], None]) -> None:
        event.listen(self.session, "after_commit", lambda _session: count(self.metrics), once=True)


def get_commit_counts(request: Request, session: SessionDep) -> CommitCounts:
    return CommitCounts(metrics_of(request.app), session)


# scope="function", like the session it listens to.
CommitCountsDep = Annotated[CommitCounts, Depends(get_commit_counts, scope="function")]


def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics of this server (text exposition format); public, they name no repo or token."""
    return Response(metrics_of(request.app).exposition(), media_type=CONTENT_TYPE_LATEST)
