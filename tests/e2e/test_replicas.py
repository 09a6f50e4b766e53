"""Two registry server processes over one database and one store stay consistent.

64 concurrent pushes to one repo spread over both replicas number the versions exactly 1..64; concurrent
compare-and-swap moves of one alias have exactly one winner per expected value, through the API and
through the real CLI. Run on SQLite + a blob folder (two processes over one data dir) and on PostgreSQL +
S3 (moto).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _support.adapters import make_adapter
from _support.auth import TEST_TOKEN, bearer
from _support.servers import Backend, ServerProcess

from deltareg.client.api import Registry

pytestmark = pytest.mark.slow

REPO = "acme/bot"
BASE = "tmv1:" + "ab" * 32
PUSHES = 64
DELTAREG = str(Path(sys.executable).with_name("deltareg"))


# ---- server processes -----------------------------------------------------------------------------


@pytest.fixture
def replicas(backend: Backend, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(backend, tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert server.server_errors() == [], f"{server.log_path} shows 5xx answers"


# ---- adapters -------------------------------------------------------------------------------------


def push(url: str, adapter: Path, cache: Path) -> int:
    with Registry(url, cache_dir=cache, progress=False) as registry:
        return registry.push(adapter, REPO, base=BASE).version.number


# ---- tests ----------------------------------------------------------------------------------------


def test_concurrent_pushes_across_replicas_number_versions_without_gaps(replicas, tmp_path):
    adapters = [make_adapter(tmp_path / f"adapter-{i}", seed=i) for i in range(PUSHES)]
    start = threading.Barrier(16)

    def one_push(i: int) -> int:
        if i < 16:
            start.wait(timeout=60)  # the first wave leaves together
        return push(replicas[i % 2].url, adapters[i], tmp_path / f"cache-{i}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        numbers = list(pool.map(one_push, range(PUSHES)))

    assert sorted(numbers) == list(range(1, PUSHES + 1))
    for server in replicas:
        listed = httpx.get(f"{server.url}/api/v1/repos/{REPO}", headers=bearer(TEST_TOKEN), timeout=30).json()
        assert [v["number"] for v in listed["versions"]] == list(range(PUSHES, 0, -1))
    with Registry(replicas[1].url, cache_dir=tmp_path / "verify", progress=False) as registry:
        for i in (0, PUSHES // 2, PUSHES - 1):  # what was pushed is what is served, by either replica
            number = numbers[i]
            pulled = registry.pull(f"{REPO}:{number}")
            original = (adapters[i] / "adapter_model.safetensors").read_bytes()
            assert (pulled.path / "adapter_model.safetensors").read_bytes() == original
    _audit_chain_holds(replicas[0].url, {f"{REPO}:{n}" for n in range(1, PUSHES + 1)}, "push")


def _audit_chain_holds(url: str, targets: set[str], action: str) -> None:
    """Writes racing on two replicas still append one unbroken chain, one entry per write."""
    verified = httpx.get(f"{url}/api/v1/audit/verify", headers=bearer(TEST_TOKEN), timeout=60).json()
    assert verified["ok"], verified
    log = httpx.get(
        f"{url}/api/v1/audit", headers=bearer(TEST_TOKEN), params={"repo": REPO, "limit": 1000}, timeout=60
    ).json()
    assert sorted(e["target"] for e in log["entries"] if e["action"] == action) == sorted(targets)


def _move(url: str, alias: str, version: int, expected: int | None) -> httpx.Response:
    body = {"version": version, "expected": expected, "reason": f"to {version}"}
    return httpx.put(
        f"{url}/api/v1/repos/{REPO}/aliases/{alias}", json=body, headers=bearer(TEST_TOKEN), timeout=60
    )


def _race(replicas: list[ServerProcess], moves: list[tuple[int, int | None]]) -> list[httpx.Response]:
    """Send every (version, expected) move of ``production`` at once, alternating replicas."""
    start = threading.Barrier(len(moves))

    def send(i: int) -> httpx.Response:
        start.wait(timeout=60)
        version, expected = moves[i]
        return _move(replicas[i % 2].url, "production", version, expected)

    with ThreadPoolExecutor(max_workers=len(moves)) as pool:
        return list(pool.map(send, range(len(moves))))


def _holder(url: str, alias: str) -> int:
    answer = httpx.get(
        f"{url}/api/v1/resolve", headers=bearer(TEST_TOKEN), params={"ref": f"{REPO}@{alias}"}, timeout=30
    )
    return int(answer.json()["number"])


def test_concurrent_alias_moves_have_exactly_one_winner_per_expected_value(replicas, tmp_path):
    for i in range(8):
        push(replicas[i % 2].url, make_adapter(tmp_path / f"adapter-{i}", seed=i), tmp_path / "cache")

    # Creation: everyone expects the alias not to exist yet.
    answers = _race(replicas, [(version, None) for version in range(1, 9)])
    winners = [a for a in answers if a.status_code == 200]
    assert len(winners) == 1, [a.text for a in answers]
    assert all(a.status_code == 409 and a.json()["error"] == "conflict" for a in answers if a not in winners)
    holder = winners[0].json()["version"]
    history = [(None, holder)]

    for _round in range(5):  # then 7 movers at a time, all expecting the current holder
        targets = [v for v in range(1, 9) if v != holder]
        answers = _race(replicas, [(version, holder) for version in targets])
        winners = [a for a in answers if a.status_code == 200]
        assert len(winners) == 1, [a.text for a in answers]
        losers = [a for a in answers if a not in winners]
        assert all(a.status_code == 409 for a in losers)
        new_holder = winners[0].json()["version"]
        assert winners[0].json()["previous"] == holder
        assert all(f"points to {new_holder}, not {holder} as expected" in a.json()["detail"] for a in losers)
        history.append((holder, new_holder))
        holder = new_holder
        assert _holder(replicas[0].url, "production") == _holder(replicas[1].url, "production") == holder

    assert _moves_recorded(replicas[0].backend) == history
    verified = httpx.get(
        f"{replicas[1].url}/api/v1/audit/verify", headers=bearer(TEST_TOKEN), timeout=60
    ).json()
    assert verified["ok"], verified
    log = httpx.get(
        f"{replicas[1].url}/api/v1/audit", headers=bearer(TEST_TOKEN), params={"limit": 1000}, timeout=60
    ).json()["entries"]
    moves = [
        (e["details"]["from"], e["details"]["to"]) for e in reversed(log) if e["action"] == "alias.promote"
    ]
    assert moves == history  # the log agrees with the alias history, move for move
    assert sum(e["action"] == "alias.promote.refused" for e in log) == 7 + 5 * 6  # every loser, recorded
    _cli_promotes_never_overwrite(replicas, tmp_path)


def _moves_recorded(backend: Backend) -> list[tuple[int | None, int]]:
    """(from, to) version numbers of every recorded move of ``production``, oldest first."""
    from sqlalchemy import text

    from deltareg.registry.config import Settings
    from deltareg.registry.db import make_engine

    url = backend.env.get("DELTAREG_DATABASE_URL") or Settings(data_dir=backend.data_dir).database_url
    engine = make_engine(url)
    query = text(
        "SELECT f.number, t.number FROM alias_moves m LEFT JOIN versions f ON f.id = m.from_version_id "
        "JOIN versions t ON t.id = m.to_version_id WHERE m.alias = 'production' ORDER BY m.id"
    )
    try:
        with engine.connect() as connection:
            return [(row[0], row[1]) for row in connection.execute(query)]
    finally:
        engine.dispose()


def _cli(url: str, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DELTAREG_URL": url, "DELTAREG_CACHE_DIR": str(tmp_path / "cli-cache")}
    env.pop("DELTAREG_DEBUG", None)
    pipe = subprocess.PIPE
    return subprocess.Popen([DELTAREG, *args], env=env, stdout=pipe, stderr=pipe, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _cli_promotes_never_overwrite(replicas: list[ServerProcess], tmp_path: Path) -> None:
    """Through the real CLI: two operators on two replicas promoting over each other's head."""
    promote = ("promote", "--alias", "canary")
    code, _out, err = _finish(_cli(replicas[0].url, tmp_path, *promote, f"{REPO}:1", "--expect", "none"))
    assert code == 0, err

    racers = [_cli(replicas[i].url, tmp_path, *promote, f"{REPO}:{2 + i}", "--expect", "1") for i in range(2)]
    results = [_finish(proc) for proc in racers]
    assert sorted(code for code, _out, _err in results) == [0, 1], results
    winner = next(i for i, (code, _out, _err) in enumerate(results) if code == 0)
    assert f"alias canary of {REPO} points to {2 + winner}, not 1 as expected" in results[1 - winner][2]
    assert _holder(replicas[1].url, "canary") == 2 + winner

    # Without --expect the CLI reads the holder first, so a plain promote moves it.
    code, out, err = _finish(_cli(replicas[1].url, tmp_path, *promote, f"{REPO}:4", "--reason", "hotfix"))
    assert code == 0, err
    assert f"moved canary of {REPO}: {2 + winner} -> 4" in out
    code, out, err = _finish(_cli(replicas[0].url, tmp_path, "aliases", REPO, "--json"))
    assert code == 0, err
    assert ("canary", 4) in [(a["name"], a["version"]) for a in json.loads(out)["aliases"]]
