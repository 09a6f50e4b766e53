"""Benchmark: ``pull`` of a version already in the client's cache vs a fresh pull of it (empty cache).

A real registry process (uvicorn; SQLite + blob folder, the embedded layout with explicit URLs) holds one
pushed version: a PEFT-format LoRA adapter whose adapter_model.safetensors is --size-mb of random float32
factors. Each round pulls it with ``Registry.pull`` into an empty cache (fresh), then pulls it again with
the same cache (cached).

That a cached pull transfers no blob is checked on the server, not taken from the client: the registry's
access log (one line per request) is cut at each pull, and its blob requests (``GET`` / ``HEAD
/api/v1/blobs/{digest}``, and ``POST /api/v1/blobs/downloads``, the download plan) are counted; the bytes
the server process read meanwhile (``rchar`` of /proc/<pid>/io: the blob files it sent, and its database
pages) are measured beside. Medians over
--runs rounds; the ratio is cached / fresh wall time.

    .venv/bin/python bench/bench_cache.py --size-mb 256 --runs 5
    .venv/bin/python bench/bench_cache.py --size-mb 16 --runs 1      # smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from _report_common import Result, add_json_out_argument, describe_machine
from bench_registry_transfer import BASE, write_adapter
from bench_transfer import exit_cleanly_on_sigterm, free_port

from deltareg.client import Registry

BENCH_TOKEN = "deltareg-bench-admin-token"  # the registry process it starts accepts it (bootstrap)
REPO = "bench/cached"
# The registry's access line: "GET /api/v1/blobs/{digest}" 206 12.3 ms (the route template); uvicorn's
# own, if it is ever turned back on: "GET /api/v1/blobs/sha256:<hex> HTTP/1.1" 206.
BLOB_GET = re.compile(r'"(?:GET|HEAD) /api/v1/blobs/(?:\{digest\}|sha256:[0-9a-f]{64})[ "?]')
DOWNLOAD_PLAN = re.compile(r'"POST /api/v1/blobs/downloads[ "?]')


@dataclass
class ServerView:
    """What the registry process did, read from outside the client: its access log and its I/O counters."""

    pid: int
    log: Path
    log_offset: int = 0

    def read_bytes(self) -> int:
        """Bytes the server read with read() system calls so far: /proc/<pid>/io rchar. Blob files are
        read that way to be sent (socket traffic itself is not counted there, nor is sendfile)."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise RuntimeError("no rchar in /proc/<pid>/io")

    def new_log_lines(self) -> list[str]:
        """Access log lines since the previous call."""
        with self.log.open("rb") as handle:
            handle.seek(self.log_offset)
            data = handle.read()
        self.log_offset += len(data)
        return data.decode(errors="replace").splitlines()


@dataclass(frozen=True)
class Pull:
    seconds: float
    blob_requests: int  # GET/HEAD of a blob, as the server logged them
    plan_requests: int  # download plans asked for
    server_bytes: int  # bytes the server process read meanwhile


@contextmanager
def registry_process(work: Path) -> Iterator[tuple[str, ServerView]]:
    """A registry on SQLite + a blob folder in ``work``, its access log in ``work/registry.log``."""
    port = free_port()
    env = {
        **os.environ,
        "DELTAREG_DATABASE_URL": f"sqlite:///{work / 'registry.db'}",
        "DELTAREG_STORAGE_URL": f"file://{work / 'blobs'}",
        "DELTAREG_BOOTSTRAP_TOKEN": BENCH_TOKEN,
        "PYTHONUNBUFFERED": "1",  # each access log line reaches the file when it is logged
    }
    env.pop("DELTAREG_DEBUG", None)
    log = work / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deltareg.registry.serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url, ServerView(proc.pid, log)
    finally:
        proc.terminate()
        proc.wait(30)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"registry exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"registry at {url} did not come up:\n{log.read_text(errors='replace')}")


def observed_pull(server: ServerView, pull: Callable[[], object]) -> Pull:
    """Run ``pull`` and count, on the server's side, what it asked for and how many bytes were sent."""
    server.new_log_lines()  # skip whatever came before
    read_before = server.read_bytes()
    start = time.perf_counter()
    pull()
    seconds = time.perf_counter() - start
    time.sleep(0.2)  # the last access log line is written as its response starts; let it land
    lines = server.new_log_lines()
    return Pull(
        seconds=seconds,
        blob_requests=sum(1 for line in lines if BLOB_GET.search(line)),
        plan_requests=sum(1 for line in lines if DOWNLOAD_PLAN.search(line)),
        server_bytes=server.read_bytes() - read_before,
    )


def one_round(url: str, server: ServerView, work: Path, round_: int) -> tuple[Pull, Pull]:
    """A fresh pull into an empty cache, then the same pull again from that cache."""
    cache = work / f"cache-{round_}"
    try:
        with Registry(url, BENCH_TOKEN, cache_dir=cache, progress=False) as reg:
            fresh = observed_pull(server, lambda: reg.pull(f"{REPO}:1"))
        with Registry(url, BENCH_TOKEN, cache_dir=cache, progress=False) as reg:
            cached = observed_pull(server, lambda: reg.pull(f"{REPO}:1"))
        return fresh, cached
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=256, help="size of the adapter's weights file")
    parser.add_argument("--runs", type=int, default=5)
    add_json_out_argument(parser)
    args = parser.parse_args()
    result = Result(
        benchmark="cache",
        title="Cache hit: `pull` of a cached version vs a fresh pull",
        runs=args.runs,
        machine=describe_machine(["httpx", "uvicorn"]),
    )
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    pulls: dict[str, list[Pull]] = {"fresh": [], "cached": []}
    try:
        with registry_process(work) as (url, server):
            adapter = work / "adapter"
            write_adapter(adapter, args.size_mb, seed=0)
            size = sum(p.stat().st_size for p in adapter.iterdir())
            with Registry(url, BENCH_TOKEN, cache_dir=work / "push-cache", progress=False) as reg:
                reg.push(adapter, REPO, base=BASE)
            print(
                f"pushed {REPO}:1, {size / 1e6:.0f} MB; {args.runs} rounds of fresh + cached pull", flush=True
            )
            for round_ in range(args.runs):
                fresh, cached = one_round(url, server, work, round_)
                pulls["fresh"].append(fresh)
                pulls["cached"].append(cached)
                print(f"  round {round_ + 1}: fresh {describe(fresh)}; cached {describe(cached)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = report(pulls, size)
    record(result, pulls, size)
    result.write(args.json_out)
    return 0 if ok else 1


def describe(pull: Pull) -> str:
    return (
        f"{pull.seconds:.3f} s, {pull.blob_requests} blob requests, {pull.plan_requests} download plans, "
        f"server read {pull.server_bytes / 1e6:.2f} MB"
    )


def medians(pulls: list[Pull]) -> Pull:
    return Pull(
        seconds=statistics.median(p.seconds for p in pulls),
        blob_requests=max(p.blob_requests for p in pulls),
        plan_requests=max(p.plan_requests for p in pulls),
        server_bytes=int(statistics.median(p.server_bytes for p in pulls)),
    )


def report(pulls: dict[str, list[Pull]], size: int) -> bool:
    """Print the table; False when a cached pull made any blob request (the cache did not work)."""
    fresh, cached = medians(pulls["fresh"]), medians(pulls["cached"])
    print(f"\n{size / 1e6:.0f} MB version, medians of {len(pulls['fresh'])} rounds (requests: the most)")
    for name, pull in (("fresh pull", fresh), ("cached pull", cached)):
        print(f"  {name:<12} {describe(pull)}")
    print(f"  cached / fresh = {cached.seconds / fresh.seconds:.3f}")
    transfers = sum(p.blob_requests + p.plan_requests for p in pulls["cached"])
    if transfers:
        print(f"  a cached pull asked the server for blobs ({transfers} requests)", file=sys.stderr)
    return transfers == 0


def record(result: Result, pulls: dict[str, list[Pull]], size: int) -> None:
    fresh, cached = medians(pulls["fresh"]), medians(pulls["cached"])
    rows = [
        [name, pull.seconds, pull.blob_requests, pull.plan_requests, pull.server_bytes / 1e6]
        for name, pull in (("fresh pull (empty cache)", fresh), ("cached pull (same version again)", cached))
    ]
    columns = ["pull", "median s", "blob GET/HEAD (server log)", "download plans", "server read MB"]
    caption = (
        f"{size / 1e6:.0f} MB version, registry on SQLite + blob folder; requests: the most in any round"
    )
    result.table(caption, columns, rows)
    result.target("cached / fresh pull", ours=cached.seconds, peer=fresh.seconds, target=None, unit="s")
    cached_requests = sum(p.blob_requests + p.plan_requests for p in pulls["cached"])
    result.target(
        "blob requests of all cached pulls (server side)",
        ours=cached_requests,
        peer=None,
        target="== 0",
        unit="requests",
    )
    result.plot(
        "cache", ["fresh pull", "cached pull"], {"median s": [fresh.seconds, cached.seconds]}, "seconds"
    )
    for name, values in pulls.items():
        result.sample(f"{name} pull s", [p.seconds for p in values])
        result.sample(f"{name} pull blob requests", [p.blob_requests for p in values])
        result.sample(f"{name} pull server MB", [p.server_bytes / 1e6 for p in values])


if __name__ == "__main__":
    sys.exit(main())
