"""`deltareg eval` and `deltareg search` through the real CLI against a real server, on SQLite and on
PostgreSQL (the ``db_server`` fixture runs every test of this module on both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support.adapters import make_adapter
from _support.auth import TEST_TOKEN, bearer
from sqlalchemy import text

from deltareg.registry.db import make_engine

pytestmark = pytest.mark.slow

BASE_A = "tmv1:" + "ab" * 32
BASE_B = "tmv1:" + "cd" * 32


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Minimal PEFT LoRA adapter folders (one target module), different bytes for each."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"adapter-{seed}", seed=seed) for seed in range(4)]


def _push(cli: Any, adapter: Path, repo: str, base: str = BASE_A) -> dict[str, Any]:
    pushed: dict[str, Any] = _json(cli("push", adapter, repo, "--base", base, "--json"))
    return pushed


def _audit(server: Any, repo: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/v1/audit", params={"repo": repo}, headers=bearer(TEST_TOKEN))
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def _database_url(server: Any) -> str:
    from deltareg.registry.config import Settings

    if server.database_url is not None:
        return str(server.database_url)
    return Settings(data_dir=server.data_dir).database_url


def _yank_in_database(server: Any, repo: str, number: int, reason: str) -> None:
    """Until `deltareg yank` lands: mark the version yanked the way the registry records it."""
    namespace, name = repo.split("/")
    engine = make_engine(_database_url(server))
    try:
        with engine.begin() as connection:
            changed = connection.execute(
                text(
                    "UPDATE versions SET yanked_at = created_at, yank_reason = :reason, yanked_by = 'carol' "
                    "WHERE number = :number AND repo_id = "
                    "(SELECT id FROM repos WHERE namespace = :namespace AND name = :name)"
                ),
                {"reason": reason, "number": number, "namespace": namespace, "name": name},
            )
            assert changed.rowcount == 1
    finally:
        engine.dispose()


def test_eval_records_scores_with_dataset_suite_and_actor(db_cli, db_server, adapters):
    repo = "evals/recorded"
    pushed = _push(db_cli, adapters[0], repo)
    args = ["--dataset", "tickets", "--dataset-revision", "r3", "--suite", "1.2"]
    recorded = _json(db_cli("eval", f"{repo}:1", "accuracy=0.91", "f1=0.5", *args, "--json"))
    assert (recorded["repo"], recorded["number"], recorded["digest"]) == (repo, 1, pushed["digest"])
    fields = ("name", "value", "dataset", "dataset_revision", "suite_version", "actor")
    assert [tuple(e[f] for f in fields) for e in recorded["evals"]] == [
        ("accuracy", 0.91, "tickets", "r3", "1.2", "alice"),
        ("f1", 0.5, "tickets", "r3", "1.2", "alice"),
    ]

    human = db_cli.as_actor("bob")("eval", f"{repo}:1", "latency_ms=12.5")
    assert human.returncode == 0, human.stderr
    assert human.stdout.strip() == f"recorded on {repo}:1: latency_ms=12.5 (by bob)"

    shown = db_cli("show", f"{repo}:1")
    assert shown.returncode == 0, shown.stderr
    assert "eval:     accuracy=0.91 (tickets@r3, suite 1.2, by alice)" in shown.stdout
    assert "eval:     latency_ms=12.5 (by bob)" in shown.stdout
    assert len(_json(db_cli("show", f"{repo}:1", "--json"))["evals"]) == 3

    entries = _audit(db_server, repo)
    assert [(e["action"], e["actor"], e["target"]) for e in entries[:2]] == [
        ("eval", "bob", f"{repo}:1"),
        ("eval", "alice", f"{repo}:1"),
    ]
    assert [e["name"] for e in entries[1]["details"]["evals"]] == ["accuracy", "f1"]


def test_eval_resolves_aliases_and_the_newest_version(db_cli, adapters):
    repo = "evals/resolved"
    for adapter in adapters[:2]:
        _push(db_cli, adapter, repo)
    assert db_cli("promote", f"{repo}:1", "--alias", "production").returncode == 0
    assert _json(db_cli("eval", f"{repo}@production", "accuracy=0.7", "--json"))["number"] == 1
    assert _json(db_cli("eval", repo, "accuracy=0.8", "--json"))["number"] == 2


def test_eval_refuses_bad_input_and_records_nothing(db_cli, db_server, adapters):
    repo = "evals/refused"
    _push(db_cli, adapters[0], repo)
    for bad in ("accuracy=nan", "accuracy=inf", "accuracy=-Infinity", "accuracy=high", "accuracy"):
        result = db_cli("eval", f"{repo}:1", "f1=0.5", bad)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "NAME=VALUE" in result.stderr and "accuracy" in result.stderr, result.stderr
    missing = db_cli("eval", f"{repo}:1")
    assert missing.returncode == 2 and "NAME=VALUE" in missing.stderr

    unknown = db_cli("eval", f"{repo}:99", "accuracy=0.5")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == f"error: {repo} has no version 99"
    no_repo = db_cli("eval", "evals/nowhere:1", "accuracy=0.5")
    assert no_repo.returncode == 1 and "evals/nowhere" in no_repo.stderr

    assert _json(db_cli("show", f"{repo}:1", "--json"))["evals"] == []
    entries = _audit(db_server, repo)
    assert [(e["action"], e["target"]) for e in entries[:2]] == [
        ("eval.refused", f"{repo}:99"),
        ("push", f"{repo}:1"),
    ]


def _refs(result: Any) -> list[str]:
    return [f"{v['repo']}:{v['number']}" for v in _json(result)]


def test_search_filters_and_prints_one_line_per_version(db_cli, db_server, adapters):
    # srch/bot:1 (base A) accuracy 0.9 on d1, then 0.5 on d1: its newest fails accuracy>=0.8
    # srch/bot:2 (base A) accuracy 0.85 on d1                            @production
    # srch/other:1 (base B) accuracy 0.95 on d2
    # srch/other:2 (base B) accuracy 0.99 on d2, yanked
    _push(db_cli, adapters[0], "srch/bot")
    _push(db_cli, adapters[1], "srch/bot")
    _push(db_cli, adapters[2], "srch/other", BASE_B)
    _push(db_cli, adapters[3], "srch/other", BASE_B)
    for ref, value, dataset in [
        ("srch/bot:1", "0.9", "d1"),
        ("srch/bot:2", "0.85", "d1"),
        ("srch/other:1", "0.95", "d2"),
        ("srch/other:2", "0.99", "d2"),
        ("srch/bot:1", "0.5", "d1"),
    ]:
        assert db_cli("eval", ref, f"accuracy={value}", "--dataset", dataset).returncode == 0
    assert db_cli("promote", "srch/bot:2", "--alias", "production").returncode == 0
    _yank_in_database(db_server, "srch/other", 2, "regressed")

    def search(*args: str) -> list[str]:
        return _refs(db_cli("search", "--namespace", "srch", *args, "--json"))

    assert search() == ["srch/other:1", "srch/bot:2", "srch/bot:1"]
    assert search("--include-yanked") == ["srch/other:2", "srch/other:1", "srch/bot:2", "srch/bot:1"]
    assert search("--where", "accuracy>=0.8") == ["srch/other:1", "srch/bot:2"]
    assert search("--where", "accuracy<0.6") == ["srch/bot:1"]
    assert search("--base", BASE_B) == ["srch/other:1"]
    assert search("--dataset", "d1") == ["srch/bot:2", "srch/bot:1"]
    assert search("--alias", "production") == ["srch/bot:2"]
    assert search("--where", "accuracy>=0.8", "--dataset", "d1", "--base", BASE_A) == ["srch/bot:2"]
    assert search("--where", "accuracy>=0.8", "--where", "accuracy<0.9") == ["srch/bot:2"]
    assert search("--limit", "1") == ["srch/other:1"]
    assert _refs(db_cli("search", "--repo", "srch/bot", "--json")) == ["srch/bot:2", "srch/bot:1"]

    digests = {v["number"]: v["digest"] for v in _json(db_cli("search", "--repo", "srch/bot", "--json"))}
    human = db_cli("search", "--namespace", "srch", "--where", "accuracy>=0.8")
    assert human.returncode == 0, human.stderr
    other = _json(db_cli("search", "--repo", "srch/other", "--json"))[0]["digest"]
    assert human.stdout.splitlines() == [
        f"srch/other:1  {other[:19]}  accuracy=0.95",
        f"srch/bot:2  {digests[2][:19]}  accuracy=0.85",
    ]
    yanked = db_cli("search", "--repo", "srch/other", "--include-yanked", "--limit", "1")
    assert yanked.stdout.strip().endswith("accuracy=0.99  yanked: regressed"), yanked.stdout
    empty = db_cli("search", "--namespace", "srch", "--where", "accuracy>1")
    assert (empty.returncode, empty.stdout.strip()) == (0, "no matching versions")


def test_search_refuses_bad_filters(db_cli):
    bad = db_cli("search", "--where", "accuracy>>0.8")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: invalid where 'accuracy>>0.8'"), bad.stderr
    base = db_cli("search", "--base", "tmv1:nope")
    assert base.returncode == 1 and "invalid base 'tmv1:nope'" in base.stderr
    both = db_cli("search", "--repo", "a/b", "--namespace", "a")
    assert both.returncode == 2 and "not both" in both.stderr
