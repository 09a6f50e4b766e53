"""Benchmark: resolve an alias and fetch its manifest on PostgreSQL holding 100k versions vs 1k versions.

For each size, a fresh PostgreSQL database is migrated and filled (one repo with N versions, bulk-inserted
with realistic ~2 KB manifests), a real registry process serves it (uvicorn, one worker), the alias
``production`` is set through the API to version 1 (the oldest: a scan would have to walk past every
other version), and 32 concurrent clients resolve ``bench/big@production`` (manifest included) for a
fixed time. Reported: requests/s, p50 and p99 latency, and the 100k/1k throughput ratio (issue #3 target:
>= 0.67, i.e. indexes, no scans). Medians over --runs rounds.

    .venv/bin/python bench/bench_scale.py --runs 3

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth) like the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import psycopg
from bench_transfer import exit_cleanly_on_sigterm
from sqlalchemy import create_engine, insert

from deltareg.client.manifest import Manifest
from deltareg.registry.migrate import upgrade
from deltareg.registry.models import Repo, Version

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REF = "bench/big@production"

BENCH_TOKEN = "deltareg-bench-admin-token"  # the registry process it starts accepts it (bootstrap)


def sample_manifest(number: int) -> Manifest:
    """A manifest shaped like a real LoRA push (16 modules), unique per version."""
    modules = {
        f"model.layers.{i}.self_attn.q_proj": {
            "r": 16,
            "alpha": 32,
            "scale": 2.0,
            "base_tensor": f"model.layers.{i}.self_attn.q_proj.weight",
            "shape": [2048, 2048],
            "lora_A": f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight",
            "lora_B": f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight",
        }
        for i in range(16)
    }
    digest = "sha256:" + hashlib.sha256(f"weights-{number}".encode()).hexdigest()
    return Manifest.parse(
        {
            "kind": "lora",
            "files": [
                {"path": "adapter_config.json", "digest": "sha256:" + "a" * 64, "size": 812},
                {"path": "adapter_model.safetensors", "digest": digest, "size": 16 * 2 * 16 * 2048 * 4},
            ],
            "base": {"fingerprint": "tmv1:" + "b" * 64, "name": "bench/base"},
            "params": {"peft_type": "LORA", "use_rslora": False, "fan_in_fan_out": False, "modules": modules},
            "metadata": {"run": number},
        }
    )


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"deltareg_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, versions: int, batch: int = 5000) -> None:
    upgrade(url)
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        repo_id = connection.execute(
            insert(Repo)
            .values(namespace="bench", name="big", last_version=versions, created_at=now)
            .returning(Repo.id)
        ).scalar_one()
        for start in range(1, versions + 1, batch):
            rows = []
            for number in range(start, min(start + batch, versions + 1)):
                manifest = sample_manifest(number)
                rows.append(
                    {
                        "repo_id": repo_id,
                        "number": number,
                        "digest": manifest.digest,
                        "manifest": manifest.canonical_bytes().decode(),
                        "kind": "lora",
                        "base_fingerprint": manifest.base.fingerprint,
                        "parent_digest": None,
                        "created_at": now,
                    }
                )
            connection.execute(insert(Version), rows)
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


@contextmanager
def registry(database_url: str, storage_dir: str, port: int) -> Iterator[str]:
    env = {
        **os.environ,
        "DELTAREG_DATABASE_URL": database_url,
        "DELTAREG_STORAGE_URL": f"file://{storage_dir}",
        "DELTAREG_BOOTSTRAP_TOKEN": BENCH_TOKEN,  # the load generator's admin token
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltareg.registry.serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError("registry did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


async def load(url: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """Requests/s, p50 and p99 (ms) of ``clients`` concurrent resolvers for ``seconds``."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, headers=headers) as http:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.get("/api/v1/resolve", params={"ref": REF})
                response.raise_for_status()
                assert response.json()["number"] == 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / elapsed, pick(0.50), pick(0.99)


def measure(versions: int, args: argparse.Namespace, tmp: str) -> list[tuple[float, float, float]]:
    with fresh_database() as url:
        t0 = time.perf_counter()
        fill(url, versions)
        print(f"  filled {versions} versions in {time.perf_counter() - t0:.1f}s", flush=True)
        with registry(url, tmp, args.port) as base:
            response = httpx.put(
                f"{base}/api/v1/repos/bench/big/aliases/production",
                json={"version": 1, "expected": None},
                headers={"Authorization": f"Bearer {BENCH_TOKEN}"},
                timeout=10,
            )
            response.raise_for_status()
            asyncio.run(load(base, args.clients, 2.0))  # warm-up
            return [asyncio.run(load(base, args.clients, args.seconds)) for _ in range(args.runs)]


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for versions in (args.small, args.large):
            print(f"{versions} versions:", flush=True)
            runs = measure(versions, args, tmp)
            for rps, p50, p99 in runs:
                print(f"  {rps:8.1f} req/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms", flush=True)
            results[versions] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    print(
        f"\n{args.clients} concurrent clients, resolve {REF} with manifest; medians of {args.runs} x "
        f"{args.seconds:.0f}s"
    )
    print(f"{'versions':>10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for versions, (rps, p50, p99) in results.items():
        print(f"{versions:>10} {rps:9.1f} {p50:8.1f} {p99:8.1f}")
    ratio = results[args.large][0] / results[args.small][0]
    print(f"throughput ratio {args.large}/{args.small} = {ratio:.2f} (target >= 0.67)")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
