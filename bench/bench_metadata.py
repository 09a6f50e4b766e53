"""Benchmark: the metadata API vs MLflow's model registry (issue #8: >= 20x its throughput, <= 1/10 its p99).

The request is "resolve an alias and fetch the version's metadata": deltareg
``GET /api/v1/resolve?ref=bench/big@production`` (manifest included, with a stored read token) and MLflow
``GET /api/2.0/mlflow/registered-models/alias?name=bench-big&alias=production`` (the model version, its
tags included). Both hold the same data: one repo / registered model with N versions (N = 1k and 100k),
each carrying the same ~5 KB manifest (deltareg: the version's manifest; MLflow: a ``manifest`` tag on the
version), and the alias ``production`` on version 1 (the oldest). Both run on SQLite (a file each) and on
PostgreSQL (a fresh database each on 127.0.0.1:5432, dropped at the end), under uvicorn with the same
number of worker processes (--workers, default 2 = the cores), access log on (their defaults) to
/dev/null. The load generator is ``wrk`` (Debian's; 32 connections, 2 threads, fixed duration,
``--latency``); a run with a non-2xx answer or a socket error is refused. Runs alternate between the two
servers; medians of --runs.

MLflow lives only in its own venv (bench/.venvs/mlflow, made on first use with MLFLOW_PIN); it is never a
dependency of deltareg. Its schema comes from ``mlflow db upgrade``; its rows are bulk-inserted with SQL
(100k versions through its API would take hours) and checked by reading the alias back through its API.

    .venv/bin/python bench/bench_metadata.py --runs 5 --json-out bench/results/metadata.json
    .venv/bin/python bench/bench_metadata.py --runs 1 --seconds 3 --sizes 1000 --backends sqlite  # smoke

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth) like the test suite; installs wrk with
apt-get (as root) when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FunctionType
from urllib.parse import quote

import httpx
from bench_scale import BENCH_TOKEN, fresh_database, sample_manifest
from bench_transfer import exit_cleanly_on_sigterm
from sqlalchemy import create_engine, insert, text

from deltareg.registry.migrate import upgrade
from deltareg.registry.models import Repo, Version
from deltareg.registry.observability.logs import logging_config

BENCH_DIR = Path(__file__).resolve().parent
MLFLOW_VENV = BENCH_DIR / ".venvs" / "mlflow"
# The newest MLflow pip can install here (PyPI lists mlflow 3.18.0, but its mlflow-skinny 3.18.0 is not
# there yet). Its SQLAlchemy 2.1 reaches PostgreSQL through psycopg 3, not psycopg2. uvloop and httptools
# give MLflow's uvicorn the same event loop and HTTP parser as deltareg's server extra, so that the two
# differ in their own code, not in the HTTP stack under it.
MLFLOW_PIN = ["mlflow==3.17.2", "psycopg[binary]==3.3.9", "uvloop==0.23.0", "httptools==0.9.0"]
NAMESPACE, NAME, ALIAS = "bench", "big", "production"
MLFLOW_MODEL = "bench-big"
DELTAREG_PATH = f"/api/v1/resolve?ref={quote(f'{NAMESPACE}/{NAME}@{ALIAS}', safe='')}"
MLFLOW_PATH = f"/api/2.0/mlflow/registered-models/alias?name={MLFLOW_MODEL}&alias={ALIAS}"
THROUGHPUT_TARGET, P99_TARGET = 20.0, 0.1
BATCH = 5000


@dataclass(frozen=True)
class Row:
    """One version's manifest, shared by both registries (built once: ~1 ms each)."""

    digest: str
    manifest: str
    base_fingerprint: str


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float = 0.0  # CPU time of the server's processes per request (user + system)
    load: float = 0.0  # the machine's 1-minute load average before the run


# ---------------------------------------------------------------- tools


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get)", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or "wrk"


def ensure_mlflow() -> str:
    """The pinned MLflow in its own venv (created on first use); returns its version."""
    python = MLFLOW_VENV / "bin" / "python"
    installed = MLFLOW_VENV / "deltareg-pins.txt"  # what the venv was last made with
    if not python.exists():
        print(f"creating {MLFLOW_VENV} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
    if not installed.exists() or installed.read_text() != " ".join(MLFLOW_PIN):
        print(f"installing {' '.join(MLFLOW_PIN)} into {MLFLOW_VENV}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLFLOW_PIN], check=True)
        installed.write_text(" ".join(MLFLOW_PIN))
    out = subprocess.run(
        [str(python), "-c", "import mlflow; print(mlflow.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- data


def build_rows(count: int, rows: list[Row]) -> list[Row]:
    """Extend the shared cache of manifests up to ``count`` and return the first ``count``."""
    for number in range(len(rows) + 1, count + 1):
        manifest = sample_manifest(number)
        rows.append(Row(manifest.digest, manifest.canonical_bytes().decode(), manifest.base.fingerprint))
    return rows[:count]


def fill_deltareg(url: str, rows: list[Row]) -> None:
    """Migrate and bulk-insert one repo with ``len(rows)`` versions (as bench_scale.fill, cached rows)."""
    upgrade(url)
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        repo_id = connection.execute(
            insert(Repo)
            .values(namespace=NAMESPACE, name=NAME, last_version=len(rows), created_at=now)
            .returning(Repo.id)
        ).scalar_one()
        for start in range(0, len(rows), BATCH):
            connection.execute(
                insert(Version),
                [
                    {
                        "repo_id": repo_id,
                        "number": start + i + 1,
                        "digest": row.digest,
                        "manifest": row.manifest,
                        "kind": "lora",
                        "base_fingerprint": row.base_fingerprint,
                        "parent_digest": None,
                        "created_at": now,
                    }
                    for i, row in enumerate(rows[start : start + BATCH])
                ],
            )
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


def fill_mlflow(url: str, rows: list[Row]) -> None:
    """MLflow's own schema (``mlflow db upgrade``), then its registry rows by bulk SQL insert."""
    subprocess.run(
        [str(MLFLOW_VENV / "bin" / "mlflow"), "db", "upgrade", url],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    now_ms = int(time.time() * 1000)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO registered_models (name, creation_time, last_updated_time, description, "
                "workspace) VALUES (:name, :t, :t, 'deltareg benchmark', 'default')"
            ),
            {"name": MLFLOW_MODEL, "t": now_ms},
        )
        for start in range(0, len(rows), BATCH):
            chunk = list(enumerate(rows[start : start + BATCH], start=start + 1))
            connection.execute(text(_INSERT_VERSION), [_mlflow_version(n, row, now_ms) for n, row in chunk])
            connection.execute(
                text(_INSERT_TAG),
                [{"name": MLFLOW_MODEL, "version": n, "value": row.manifest} for n, row in chunk],
            )
        connection.execute(
            text(
                "INSERT INTO registered_model_aliases (alias, version, name, workspace) "
                "VALUES (:alias, 1, :name, 'default')"
            ),
            {"alias": ALIAS, "name": MLFLOW_MODEL},
        )
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


_INSERT_VERSION = (
    "INSERT INTO model_versions (name, version, creation_time, last_updated_time, description, user_id, "
    "current_stage, source, run_id, status, status_message, run_link, storage_location, workspace) "
    "VALUES (:name, :version, :t, :t, :description, 'bench', 'None', :source, :run_id, 'READY', NULL, "
    "NULL, :source, 'default')"
)
_INSERT_TAG = (
    "INSERT INTO model_version_tags (key, value, name, version, workspace) "
    "VALUES ('manifest', :value, :name, :version, 'default')"
)


def _mlflow_version(number: int, row: Row, now_ms: int) -> dict[str, object]:
    return {
        "name": MLFLOW_MODEL,
        "version": number,
        "t": now_ms,
        "description": f"LoRA run {number}",
        "source": f"file:///artifacts/{row.digest.removeprefix('sha256:')[:32]}",
        "run_id": row.digest.removeprefix("sha256:")[:32],
    }


@contextmanager
def databases(backend: str, tmp: Path, size: int) -> Iterator[tuple[str, str]]:
    """(deltareg's database URL, MLflow's), both empty; removed or dropped afterwards."""
    if backend == "sqlite":
        try:
            yield f"sqlite:///{tmp / f'deltareg-{size}.db'}", f"sqlite:///{tmp / f'mlflow-{size}.db'}"
        finally:
            for path in tmp.glob(f"*-{size}.db*"):
                path.unlink()
        return
    # MLflow's SQLAlchemy 2.1 reaches PostgreSQL through psycopg 3 too, so one URL serves both.
    with fresh_database() as ours, fresh_database() as theirs:
        yield ours, theirs


# ---------------------------------------------------------------- servers


@contextmanager
def server(
    command: list[str], env: dict[str, str], health_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process in its own process group (uvicorn's workers die with it), logging to ``log``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, cwd=log.parent, stdout=out, stderr=out, start_new_session=True
        )
    try:
        _wait_healthy(proc, health_url, log)
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's whole process group (its uvicorn workers), SIGKILL after 20 s."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds used so far by the live processes of a process group (a server and its
    uvicorn workers). Less sensitive to other load on the machine than req/s; PostgreSQL's own backends
    are not counted."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp, ..., utime, stime
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited ({proc.returncode}):\n{output}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not become healthy")


def deltareg_server(
    url: str, tmp: Path, port: int, workers: int
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """The registry as ``deltareg serve`` runs it (its logging, its access line, no uvicorn access log),
    but with ``workers`` processes."""
    env = {
        **os.environ,
        "DELTAREG_DATABASE_URL": url,
        "DELTAREG_STORAGE_URL": (tmp / "blobs").as_uri(),
        "DELTAREG_BOOTSTRAP_TOKEN": BENCH_TOKEN,
        "DELTAREG_AUTO_MIGRATE": "false",  # migrated by fill_deltareg; workers must not race to do it
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "deltareg.registry.main:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-config",
        str(_deltareg_log_config(tmp)),
        "--no-access-log",
    ]
    return server(command, env, f"http://127.0.0.1:{port}/healthz", tmp / "deltareg.log")


def _deltareg_log_config(tmp: Path) -> Path:
    """serve.py's logging config as a file for uvicorn's --log-config (callables by dotted name)."""

    def by_name(node: object) -> object:
        if isinstance(node, dict):
            return {key: by_name(value) for key, value in node.items()}
        if isinstance(node, type | FunctionType):
            return f"{node.__module__}.{node.__qualname__}"
        return node

    path = tmp / "deltareg-logging.json"
    path.write_text(json.dumps(by_name(logging_config("text"))))
    return path


def mlflow_server(
    url: str, tmp: Path, port: int, workers: int
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """``mlflow server`` as documented (uvicorn, its access log on), ``workers`` processes."""
    command = [
        str(MLFLOW_VENV / "bin" / "mlflow"),
        "server",
        "--backend-store-uri",
        url,
        "--default-artifact-root",
        (tmp / "mlartifacts").as_uri(),
        "--no-serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Its background job runner (huey consumers, 7 processes) serves no registry read: off, so that
        # it takes no CPU from the servers under test.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return server(command, env, f"http://127.0.0.1:{port}/health", tmp / "mlflow.log")


def prepare_deltareg(base: str) -> str:
    """Point the alias at version 1 through the API and return a fresh read-only token for bench/."""
    admin = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    with httpx.Client(base_url=base, headers=admin, timeout=30) as http:
        http.put(
            f"/api/v1/repos/{NAMESPACE}/{NAME}/aliases/{ALIAS}", json={"version": 1, "expected": None}
        ).raise_for_status()
        created = http.post(
            "/api/v1/tokens",
            json={"name": "bench-reader", "scopes": ["read"], "namespaces": [NAMESPACE]},
        )
        created.raise_for_status()
        secret: str = created.json()["token"]
        body = http.get(DELTAREG_PATH, headers={"Authorization": f"Bearer {secret}"})
    body.raise_for_status()
    assert body.json()["number"] == 1 and body.json()["manifest"]["metadata"] == {"run": 1}, body.text
    return secret


def check_mlflow(base: str, expected_manifest: str) -> None:
    """The bulk-inserted rows read back through MLflow's REST API."""
    response = httpx.get(base + MLFLOW_PATH, timeout=30)
    response.raise_for_status()
    version = response.json()["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    assert version["version"] == "1" and tags["manifest"] == expected_manifest, response.text[:500]
    assert ALIAS in version.get("aliases", []), response.text[:500]


# ---------------------------------------------------------------- load


def run_wrk(wrk: str, url: str, token: str | None, seconds: float, args: argparse.Namespace) -> WrkResult:
    """One wrk run; raises when any answer was not 2xx or a socket error happened (an invalid run)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if token:
            script.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    try:
        out = subprocess.run(
            [
                wrk,
                "-t",
                str(args.threads),
                "-c",
                str(args.clients),
                "-d",
                f"{seconds:g}s",
                "--timeout",
                "60s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    if "Non-2xx or 3xx responses" in out or "Socket errors" in out:
        raise RuntimeError(f"invalid run (errors):\n{out}")
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", out))
    return WrkResult(rps, _latency_ms(out, "50%"), _latency_ms(out, "99%"))


def _find(pattern: str, out: str) -> str:
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
    return match.group(1)


def _latency_ms(out: str, percentile: str) -> float:
    value = _find(rf"(?m)^\s*{percentile}\s+([\d.]+\w+)", _latency_block(out))
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _latency_block(out: str) -> str:
    return out.split("Latency Distribution", 1)[1]


# ---------------------------------------------------------------- one configuration


def measure(
    backend: str, size: int, rows: list[Row], wrk: str, tmp: Path, args: argparse.Namespace
) -> dict[str, list[WrkResult]]:
    """Seed both registries with ``size`` versions, serve both, alternate wrk runs between them."""
    t0 = time.perf_counter()
    seeded = build_rows(size, rows)
    with databases(backend, tmp, size) as (ours, theirs):
        fill_deltareg(ours, seeded)
        t1 = time.perf_counter()
        fill_mlflow(theirs, seeded)
        print(
            f"  seeded {size} versions: deltareg {t1 - t0:.1f}s, MLflow {time.perf_counter() - t1:.1f}s",
            flush=True,
        )
        ours_port, theirs_port = free_port(), free_port()
        with (
            deltareg_server(ours, tmp, ours_port, args.workers) as ours_proc,
            mlflow_server(theirs, tmp, theirs_port, args.workers) as theirs_proc,
        ):
            token = prepare_deltareg(f"http://127.0.0.1:{ours_port}")
            check_mlflow(f"http://127.0.0.1:{theirs_port}", seeded[0].manifest)
            targets = {
                "deltareg": (f"http://127.0.0.1:{ours_port}{DELTAREG_PATH}", token, ours_proc.pid),
                "MLflow": (f"http://127.0.0.1:{theirs_port}{MLFLOW_PATH}", None, theirs_proc.pid),
            }
            for url, secret, _ in targets.values():
                run_wrk(wrk, url, secret, args.warmup, args)
            results: dict[str, list[WrkResult]] = {name: [] for name in targets}
            for run in range(args.runs):
                order = list(targets) if run % 2 == 0 else list(reversed(targets))
                for name in order:
                    results[name].append(one_run(name, *targets[name], wrk, args))
    return results


def one_run(
    name: str, url: str, secret: str | None, pgid: int, wrk: str, args: argparse.Namespace
) -> WrkResult:
    load = os.getloadavg()[0]
    cpu_before = group_cpu_seconds(pgid)
    result = run_wrk(wrk, url, secret, args.seconds, args)
    cpu_ms = (group_cpu_seconds(pgid) - cpu_before) * 1000 / (result.rps * args.seconds)
    print(
        f"  {name:8} {result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  "
        f"server CPU {cpu_ms:6.2f} ms/req  (load before {load:.2f})",
        flush=True,
    )
    return WrkResult(result.rps, result.p50_ms, result.p99_ms, cpu_ms, load)


# ---------------------------------------------------------------- report


def median_of(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        statistics.median(r.cpu_ms for r in results),
    )


def report(
    all_results: dict[tuple[str, int], dict[str, list[WrkResult]]],
    args: argparse.Namespace,
    mlflow_version: str,
    load_before: float,
) -> dict[str, object]:
    tables, targets, samples = [], [], {}
    labels, ours_rps, theirs_rps = [], [], []
    peer = f"MLflow {mlflow_version}"
    for (backend, size), results in all_results.items():
        label = f"{'SQLite' if backend == 'sqlite' else 'PostgreSQL'} {_size_label(size)}"
        ours, theirs = median_of(results["deltareg"]), median_of(results["MLflow"])
        throughput, p99 = ours.rps / theirs.rps, ours.p99_ms / theirs.p99_ms
        tables.append(
            {
                "caption": f"{label} versions",
                "columns": [
                    "route",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "x peer",
                    "p99 / peer",
                    "server CPU ms/req",
                ],
                "rows": [
                    [
                        "deltareg",
                        _r(ours.rps),
                        _r(ours.p50_ms),
                        _r(ours.p99_ms),
                        _r(throughput, 2),
                        _r(p99, 3),
                        _r(ours.cpu_ms, 2),
                    ],
                    [
                        peer,
                        _r(theirs.rps),
                        _r(theirs.p50_ms),
                        _r(theirs.p99_ms),
                        1.0,
                        1.0,
                        _r(theirs.cpu_ms, 2),
                    ],
                ],
            }
        )
        targets += [
            _target(f"throughput vs MLflow, {label}", ours.rps, theirs.rps, THROUGHPUT_TARGET, "req/s"),
            _target(f"p99 vs MLflow, {label}", ours.p99_ms, theirs.p99_ms, P99_TARGET, "ms"),
        ]
        for name, runs in results.items():
            key = f"{name} {backend} {_size_label(size)}"
            samples[f"{key} req/s"] = [_r(r.rps) for r in runs]
            samples[f"{key} p99 ms"] = [_r(r.p99_ms) for r in runs]
            samples[f"{key} server CPU ms/req"] = [_r(r.cpu_ms, 2) for r in runs]
        labels.append(label)
        ours_rps.append(_r(ours.rps))
        theirs_rps.append(_r(theirs.rps))
    return {
        "benchmark": "metadata",
        "title": "Metadata API vs MLflow model registry",
        "issue": 8,
        "command": " ".join([".venv/bin/python", "bench/bench_metadata.py", *sys.argv[1:]]),
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**_machine(mlflow_version, load_before), "load_during": _load_range(all_results)},
        "runs": args.runs,
        "settings": {
            "clients": args.clients,
            "wrk_threads": args.threads,
            "seconds": args.seconds,
            "workers_each": args.workers,
            "shape": "one repo / registered model, alias on version 1",
        },
        "tables": tables,
        "targets": targets,
        "plots": [
            {
                "name": "metadata-throughput",
                "kind": "bar",
                "ylabel": "req/s",
                "series": {"deltareg": ours_rps, "MLflow": theirs_rps},
                "labels": labels,
            }
        ],
        "samples": samples,
    }


def _load_range(all_results: dict[tuple[str, int], dict[str, list[WrkResult]]]) -> list[float]:
    loads = [r.load for results in all_results.values() for runs in results.values() for r in runs]
    return [round(min(loads), 2), round(max(loads), 2)]


def _target(name: str, ours: float, peer: float, wanted: float, unit: str) -> dict[str, object]:
    if unit == "req/s":
        ratio, target, met = ours / peer, f">= {wanted:g}", ours / peer >= wanted
    else:
        ratio, target, met = ours / peer, f"<= {wanted:g}", ours / peer <= wanted
    return {
        "name": name,
        "ours": _r(ours),
        "peer": _r(peer),
        "ratio": _r(ratio, 3),
        "target": target,
        "met": bool(met),
        "unit": unit,
    }


def _r(value: float, digits: int = 1) -> float:
    return round(value, digits) if value >= 1 or digits > 1 else round(value, 3)


def _size_label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def _machine(mlflow_version: str, load_before: float) -> dict[str, object]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[:2]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "load_before": round(load_before, 2),
        "versions": {"mlflow": mlflow_version, "wrk": " ".join(wrk_version)},
    }


def print_tables(result: dict[str, object]) -> None:
    for table in result["tables"]:  # type: ignore[attr-defined]
        print(f"\n{table['caption']}")
        print(
            f"  {'route':14} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'x peer':>8} {'p99/peer':>9} "
            f"{'CPU ms/req':>11}"
        )
        for row in table["rows"]:
            print(
                f"  {row[0]:14} {row[1]:9.1f} {row[2]:9.2f} {row[3]:9.2f} {row[4]:8.2f} {row[5]:9.3f} "
                f"{row[6]:11.2f}"
            )
    print()
    for target in result["targets"]:  # type: ignore[attr-defined]
        mark = "met" if target["met"] else "MISSED"
        print(f"  {target['name']}: ratio {target['ratio']} (target {target['target']}) {mark}")


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes, each server")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument(
        "--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    wrk = ensure_wrk()
    mlflow_version = ensure_mlflow()
    load_before = os.getloadavg()[0]
    print(f"MLflow {mlflow_version}, {args.workers} workers each, load {load_before:.2f}", flush=True)
    rows: list[Row] = []
    all_results = {}
    with tempfile.TemporaryDirectory(prefix="deltareg-bench-metadata-") as tmp:
        for backend in args.backends:
            for size in args.sizes:
                print(f"{backend}, {size} versions:", flush=True)
                all_results[(backend, size)] = measure(backend, size, rows, wrk, Path(tmp), args)
    result = report(all_results, args, mlflow_version, load_before)
    print_tables(result)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
