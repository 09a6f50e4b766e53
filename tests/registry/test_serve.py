"""The server as a real process: ``python -m deltareg.registry.serve``, and concurrent pushes to it on
every backend (version numbers come from the database's row lock + UPDATE ... RETURNING)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _support.auth import TEST_TOKEN, bearer

pytestmark = pytest.mark.slow
STARTUP_GUARD_SECONDS = 120  # only stops a hung test; nothing is asserted about speed


def _startup_lines(process: subprocess.Popen[str]) -> list[str]:
    """What the server printed up to its "listening" line, which comes last, when it is ready."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []

    def read() -> None:
        while not lines or not lines[-1].startswith("deltareg registry listening"):
            line = stdout.readline()
            if not line:
                return
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(STARTUP_GUARD_SECONDS)
    if not lines or not lines[-1].startswith("deltareg registry listening"):
        raise AssertionError(f"the server printed {lines} and no listening line")
    return lines


@pytest.fixture
def server(tmp_path: Path, backend: str, settings) -> Iterator[tuple[str, Path]]:
    """The server for this test's backend; the embedded default (sqlite-fs) gets only --data-dir."""
    data_dir = tmp_path / "served"
    env = {**os.environ}
    if backend != "sqlite-fs":
        env["DELTAREG_DATABASE_URL"] = settings.database_url
        env["DELTAREG_STORAGE_URL"] = settings.storage_url
        env["DELTAREG_S3_ENDPOINT_URL"] = settings.s3_endpoint_url or ""
    process = subprocess.Popen(
        [sys.executable, "-m", "deltareg.registry.serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        *before, line = _startup_lines(process)
        match = re.fullmatch(r"deltareg registry listening on (http://127\.0\.0\.1:(\d+)) \((.+)\)\n", line)
        assert match, line
        assert match.group(2) != "0"
        if backend == "sqlite-fs":
            assert match.group(3) == f"data in {data_dir.resolve()}"
            # the embedded default made its admin token and handed it to the CLI on this machine
            assert before and before[0].startswith("created an admin token")
        else:
            assert before == []
        if backend != "sqlite-fs":
            assert match.group(3) == f"database {settings.database_url}, blobs {settings.storage_url}"
        yield match.group(1), data_dir
    finally:
        process.terminate()
        process.wait(timeout=STARTUP_GUARD_SECONDS)


def _upload(http: httpx.Client, build, files: dict[str, bytes]) -> None:
    for data in files.values():
        response = http.put(f"/api/v1/blobs/{build.digest_of(data)}", content=data)
        assert response.status_code in (200, 201), response.text


def _push_all_at_once(base_url: str, repo: str, manifests: list[dict]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(manifests))
    responses: list[httpx.Response | None] = [None] * len(manifests)

    def push(index: int) -> None:
        with httpx.Client(base_url=base_url, headers=bearer(TEST_TOKEN)) as http:
            barrier.wait()
            responses[index] = http.post(
                f"/api/v1/repos/{repo}/versions", json={"manifest": manifests[index]}
            )

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(manifests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None for r in responses)
    return [r for r in responses if r is not None]


@pytest.mark.backends("sqlite-fs")
def test_served_registry_answers_and_keeps_its_data_in_the_data_dir(server, build):
    base_url, data_dir = server
    with httpx.Client(base_url=base_url, headers=bearer(TEST_TOKEN)) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        files = build.lora_files()
        _upload(http, build, files)
        created = http.post("/api/v1/repos/acme/bot/versions", json={"manifest": build.manifest_for(files)})
        assert created.status_code == 201
    assert (data_dir / "registry.db").is_file()
    assert len([p for p in (data_dir / "blobs" / "sha256").rglob("*") if p.is_file()]) == 2


CONCURRENT_PUSHES = 12


def test_concurrent_first_pushes_get_distinct_numbers(server, build):
    base_url, _ = server
    file_sets = [build.lora_files(seed) for seed in range(CONCURRENT_PUSHES)]
    with httpx.Client(base_url=base_url, headers=bearer(TEST_TOKEN)) as http:
        for files in file_sets:
            _upload(http, build, files)
    responses = _push_all_at_once(base_url, "acme/race", [build.manifest_for(f) for f in file_sets])
    assert [r.status_code for r in responses] == [201] * CONCURRENT_PUSHES, [r.text for r in responses]
    assert sorted(r.json()["number"] for r in responses) == list(range(1, CONCURRENT_PUSHES + 1))
    with httpx.Client(base_url=base_url, headers=bearer(TEST_TOKEN)) as http:
        shown = http.get("/api/v1/repos/acme/race").json()["versions"]
    assert [v["number"] for v in shown] == list(range(CONCURRENT_PUSHES, 0, -1))


def test_concurrent_identical_pushes_make_one_version(server, build):
    base_url, _ = server
    files = build.lora_files()
    with httpx.Client(base_url=base_url, headers=bearer(TEST_TOKEN)) as http:
        _upload(http, build, files)
    responses = _push_all_at_once(base_url, "acme/same", [build.manifest_for(files)] * 4)
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201], [r.text for r in responses]
    assert {r.json()["number"] for r in responses} == {1}
