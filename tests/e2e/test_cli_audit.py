"""`deltareg audit`, `deltareg audit verify`, `deltareg history` and `show REPO@ALIAS --at` through the
real CLI against a real server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from deltareg.registry.db import make_engine

pytestmark = pytest.mark.slow

REPO = "acme/audited"
FINGERPRINT = "tmv1:" + "0f" * 32


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def adapters(tiny_llama, lora_adapter) -> list[Any]:
    base = tiny_llama()
    return [lora_adapter(base, seed=seed) for seed in range(3)]


def _database_url(server: Any) -> str:
    """The server's database: a PostgreSQL URL in its environment, else the data dir's SQLite file."""
    from deltareg.registry.config import Settings

    return server.database_url or Settings(data_dir=server.data_dir).database_url


def test_every_write_is_in_the_log_with_its_actor_and_the_chain_verifies(db_cli, db_server, adapters):
    for adapter in adapters[:2]:
        _json(db_cli("push", adapter, REPO, "--base", FINGERPRINT, "--json"))
    bob = db_cli.as_actor("bob")
    _json(bob("promote", f"{REPO}:1", "--alias", "production", "--json"))
    refused = bob("promote", f"{REPO}:2", "--alias", "production", "--expect", "2")
    assert refused.returncode == 1 and "points to 1, not 2" in refused.stderr

    log = _json(db_cli("audit", REPO, "--json"))["entries"]
    assert [(e["actor"], e["action"], e["target"]) for e in log[:4]] == [
        ("bob", "alias.promote.refused", f"{REPO}@production"),
        ("bob", "alias.promote", f"{REPO}@production"),
        ("alice", "push", f"{REPO}:2"),
        ("alice", "push", f"{REPO}:1"),
    ]
    human = db_cli("audit", REPO)
    assert human.returncode == 0 and "\tbob\talias.promote\tacme/audited@production\t" in human.stdout

    verified = db_cli("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("audit log intact: ")


def test_audit_verify_fails_with_exit_3_naming_the_edited_entry(db_cli, db_server, adapters):
    _json(db_cli("push", adapters[2], REPO, "--base", FINGERPRINT, "--json"))
    newest = _json(db_cli("audit", "--limit", "1", "--json"))["entries"][0]
    engine = make_engine(_database_url(db_server))
    try:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE audit_log SET actor = 'mallory' WHERE id = :id"), {"id": newest["id"]}
            )
        result = db_cli("audit", "verify")
        assert result.returncode == 3, (result.stdout, result.stderr)
        assert f"audit log entry {newest['id']} does not verify: its content does not match its hash" in (
            result.stderr
        )
    finally:
        with engine.begin() as connection:  # put it back for the module's other tests
            connection.execute(
                text("UPDATE audit_log SET actor = :actor WHERE id = :id"),
                {"actor": newest["actor"], "id": newest["id"]},
            )
        engine.dispose()
    assert db_cli("audit", "verify").returncode == 0


def test_history_and_show_at_a_time(db_cli, db_server, adapters):
    for adapter in adapters[:2]:
        _json(db_cli("push", adapter, "acme/timeline", "--base", FINGERPRINT, "--json"))
    _json(db_cli("promote", "acme/timeline:1", "--alias", "production", "--reason", "first", "--json"))
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    _json(db_cli("promote", "acme/timeline:2", "--alias", "production", "--json"))

    history = _json(db_cli("history", "acme/timeline", "--alias", "production", "--json"))["moves"]
    assert [(m["from_version"], m["to_version"], m["actor"]) for m in history] == [
        (1, 2, "alice"),
        (None, 1, "alice"),
    ]
    table = db_cli("history", "acme/timeline", "--alias", "production")
    assert "(created) -> 1\talice\tfirst" in table.stdout

    then = _json(db_cli("show", "acme/timeline@production", "--at", between.isoformat(), "--json"))
    assert then["number"] == 1
    now = _json(db_cli("show", "acme/timeline@production", "--json"))
    assert now["number"] == 2
    local = between.astimezone().replace(tzinfo=None).isoformat()  # no offset: the machine's local time
    assert _json(db_cli("show", "acme/timeline@production", "--at", local, "--json"))["number"] == 1

    before = db_cli("show", "acme/timeline@production", "--at", "2000-01-01T00:00:00Z")
    assert before.returncode == 1 and "did not exist at 2000-01-01" in before.stderr
    not_alias = db_cli("show", "acme/timeline:1", "--at", "2000-01-01T00:00:00Z")
    assert not_alias.returncode == 2 and "REPO@ALIAS" in not_alias.stderr
    garbage = db_cli("show", "acme/timeline@production", "--at", "yesterday")
    assert garbage.returncode == 2 and "ISO 8601" in garbage.stderr
