"""SIGKILL of a real server in the middle of uploads and commits, round after round.

After every kill the server is restarted on the same database and store: no version is visible without
all of its files (every visible version pulls and verifies), version numbers have no gaps, and the pushes
that were cut off succeed when repeated. At the end ``deltareg gc --grace 0`` clears what the kills left
behind (half-written uploads) without touching any version. On SQLite + a blob folder and on
PostgreSQL + S3 (moto).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from _support.auth import TEST_TOKEN, bearer
from _support.servers import Backend, ServerProcess
from safetensors.numpy import save_file

from deltareg.client.api import Registry
from deltareg.client.errors import ConnectionFailed, DeltaregError

pytestmark = pytest.mark.slow

REPO = "acme/crash"
BASE = "tmv1:" + "cd" * 32
ROUNDS = 5
PUSHERS = 3
DELTAREG = str(Path(sys.executable).with_name("deltareg"))


# ---- pushes cut off by a kill -----------------------------------------------------------------------


class Adapters:
    """Fresh PEFT LoRA adapter folders of about 512 KB (different bytes every time)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.lock = threading.Lock()

    def new(self) -> Path:
        with self.lock:
            self.count += 1
            seed = self.count
        folder = self.root / f"adapter-{seed}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        tensors = {
            "base_model.model.layer.lora_A.weight": rng.standard_normal((8, 8192)).astype(np.float32),
            "base_model.model.layer.lora_B.weight": rng.standard_normal((8192, 8)).astype(np.float32),
        }
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["layer"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder


@dataclass
class Load:
    """Threads pushing new adapters back to back until the server dies under them."""

    url: str
    adapters: Adapters
    cache: Path
    pushed: threading.Event = field(default_factory=threading.Event)
    interrupted: list[Path] = field(default_factory=list)
    unexpected: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, count: int) -> None:
        self.threads = [threading.Thread(target=self._push_until_killed) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _push_until_killed(self) -> None:
        with Registry(self.url, cache_dir=self.cache, progress=False) as registry:
            while True:
                adapter = self.adapters.new()
                try:
                    registry.push(adapter, REPO, base=BASE)
                except (ConnectionFailed, OSError):
                    self.interrupted.append(adapter)  # the server died while this push was in flight
                    return
                except (DeltaregError, Exception) as exc:
                    self.interrupted.append(adapter)
                    self.unexpected.append(exc)
                    return
                self.pushed.set()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)


def stall_an_upload(server: ServerProcess, data: bytes) -> tuple[threading.Thread, threading.Event]:
    """PUT ``data`` through the registry API, sending the first half and then waiting (fs store only)."""
    release = threading.Event()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def body() -> Iterator[bytes]:
        yield data[: len(data) // 2]
        release.wait(timeout=60)
        yield data[len(data) // 2 :]

    def send() -> None:
        try:
            httpx.put(
                f"{server.url}/api/v1/blobs/{digest}", content=body(), headers=bearer(TEST_TOKEN), timeout=60
            )
        except httpx.TransportError:
            pass  # expected: the server was killed mid-body

    thread = threading.Thread(target=send)
    thread.start()
    return thread, release


def wait_for_partial_upload(staging: Path, before: set[Path]) -> None:
    """Until the server has written part of the stalled upload to its staging folder."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.stat().st_size > 0 for p in set(staging.iterdir()) - before):
            return
        time.sleep(0.01)
    raise AssertionError("the stalled upload never reached the server's staging folder")


# ---- checks -----------------------------------------------------------------------------------------


def check_versions(url: str, cache: Path, first: int) -> int:
    """Every visible version numbered 1..n without gaps; versions >= ``first`` pull and verify. Returns n."""
    answer = httpx.get(f"{url}/api/v1/repos/{REPO}", headers=bearer(TEST_TOKEN), timeout=30)
    if answer.status_code == 404:
        return 0
    numbers = sorted(v["number"] for v in answer.json()["versions"])
    assert numbers == list(range(1, len(numbers) + 1))
    with Registry(url, cache_dir=cache, progress=False) as registry:
        for number in numbers[first - 1 :]:
            registry.pull(f"{REPO}:{number}")  # downloads every file and checks its digest
    return len(numbers)


def gc_command(backend: Backend, *args: str) -> dict[str, object]:
    env = {**os.environ, **backend.env}
    result = subprocess.run(
        [DELTAREG, "gc", *args, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


# ---- the test ----------------------------------------------------------------------------------------


def test_sigkill_during_uploads_and_commits_never_leaves_a_partial_version(backend, backend_server, tmp_path):
    adapters = Adapters(tmp_path / "adapters")
    staging = backend.data_dir / "blobs" / "tmp"
    stalled_uploads = 0
    verified = 0
    for round_number in range(ROUNDS):
        load = Load(backend_server.url, adapters, tmp_path / f"cache-{round_number}")
        load.start(PUSHERS)
        stalled = None
        if backend.name == "sqlite-fs" and round_number % 2 == 0:
            before = set(staging.iterdir())
            stalled = stall_an_upload(backend_server, os.urandom(4 << 20))
            wait_for_partial_upload(staging, before)
            stalled_uploads += 1
        assert load.pushed.wait(timeout=120), "no push finished before the kill"
        backend_server.kill()  # pushers are mid-upload or mid-commit now
        load.join()
        if stalled is not None:
            stalled[1].set()
            stalled[0].join(timeout=60)
        assert load.unexpected == [], load.unexpected

        backend_server.start()
        with Registry(backend_server.url, cache_dir=tmp_path / "repush", progress=False) as registry:
            for adapter in load.interrupted:  # the cut-off pushes go through now
                registry.push(adapter, REPO, base=BASE)
        # Versions are immutable and numbers only grow, so checking after the re-pushes also covers
        # what was visible right after the restart.
        verified = check_versions(backend_server.url, tmp_path / f"verify-{round_number}", verified + 1)

    if backend.name == "sqlite-fs":
        assert stalled_uploads == (ROUNDS + 1) // 2
        assert any(staging.iterdir()), "the killed uploads left nothing in staging"
    report = gc_command(backend, "--grace", "0")
    assert report["blobs"] == [] and report["strays"] == []  # every recorded blob belongs to a version
    if backend.name == "sqlite-fs":
        assert report["uploads"] and not any(staging.iterdir())
    assert check_versions(backend_server.url, tmp_path / "verify-final", 1) == verified
