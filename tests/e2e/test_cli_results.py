"""`deltareg result record|list` through the real CLI against a real server (the API itself is covered on
SQLite and PostgreSQL by tests/registry/test_results.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _support.adapters import make_adapter

pytestmark = pytest.mark.slow

BASE = "tmv1:" + "ab" * 32
RESULT = "tmv1:" + "12" * 32
OTHER = "tmv1:" + "34" * 32


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_result_record_and_list(cli, tmp_path):
    repo = "results/bot"
    assert (
        cli("push", make_adapter(tmp_path / "adapter", seed=0), repo, "--base", BASE, "--json").returncode
        == 0
    )

    recorded = cli("result", "record", f"{repo}:1", "--dtype", "bf16", RESULT)
    assert recorded.returncode == 0, recorded.stderr
    assert f"recorded on {repo}:1 BF16: {RESULT}" in recorded.stdout
    again = _json(cli("result", "record", repo, "--dtype", "BF16", RESULT, "--json"))
    assert (again["number"], again["created"], again["actor"]) == (1, False, "alice")

    conflict = cli("result", "record", f"{repo}:1", "--dtype", "BF16", OTHER)
    assert conflict.returncode == 1
    assert "immutable" in conflict.stderr and OTHER in conflict.stderr
    malformed = cli("result", "record", f"{repo}:1", "--dtype", "F32", "tmv1:nothex")
    assert malformed.returncode == 1 and "fingerprint" in malformed.stderr

    listed = _json(cli("result", "list", f"{repo}:1", "--json"))
    assert [(r["base_dtype"], r["fingerprint"], r["actor"]) for r in listed] == [("BF16", RESULT, "alice")]
    human = cli("result", "list", f"{repo}:1")
    assert human.returncode == 0 and human.stdout.startswith(f"BF16  {RESULT}  by alice")
    assert cli("result", "list", f"{repo}:9").returncode == 1
