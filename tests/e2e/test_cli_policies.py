"""Governance through the real CLI against a real registry process, on SQLite + a blob folder and on
PostgreSQL + S3 (moto): policy set/show/clear, a promotion refused with every failed rule listed, approve,
rollback, yank (refused on an alias holder, then with --rollback), and pulls of yanked versions refused
unless named exactly with --allow-yanked, even from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _support.adapters import make_adapter
from _support.auth import create_token

pytestmark = pytest.mark.slow

REPO = "acme/bot"
BASE = "tmv1:" + "ef" * 32
DELTAREG = str(Path(sys.executable).with_name("deltareg"))


class Cli:
    """The CLI against one server, acting as whoever each call names (a token of that name)."""

    def __init__(self, url: str, cache: Path) -> None:
        self.url = url
        self.env = {**os.environ, "DELTAREG_URL": url, "DELTAREG_CACHE_DIR": str(cache)}
        self.env.pop("DELTAREG_DEBUG", None)
        self.tokens: dict[str, str] = {}

    def __call__(self, *args: str | Path, actor: str = "carol") -> subprocess.CompletedProcess[str]:
        if actor not in self.tokens:
            self.tokens[actor] = create_token(self.url, actor)
        return subprocess.run(
            [DELTAREG, *map(str, args)],
            env={**self.env, "DELTAREG_TOKEN": self.tokens[actor]},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str | Path, actor: str = "carol") -> str:
        result = self(*args, actor=actor)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def json(self, *args: str | Path, actor: str = "carol") -> dict:
        return json.loads(self.ok(*args, "--json", actor=actor))

    def fails(self, *args: str | Path, actor: str = "carol") -> str:
        """Exit 1 with one error line on stderr (and nothing on stdout); the line."""
        result = self(*args, actor=actor)
        assert (result.returncode, result.stdout) == (1, ""), (
            result.returncode,
            result.stdout,
            result.stderr,
        )
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]


def test_policies_approvals_rollback_yank_and_pulls_through_the_cli(backend_server, tmp_path):
    cli = Cli(backend_server.url, tmp_path / "cache")
    scores = {1: ("0.85", "1.0"), 2: ("0.79", "1.1"), 3: ("0.9", "0.9")}
    for seed, (accuracy, loss) in scores.items():
        adapter = make_adapter(tmp_path / f"adapter-{seed}", seed)
        args = (
            "push",
            adapter,
            REPO,
            "--base",
            BASE,
            "--eval",
            f"accuracy={accuracy}",
            "--eval",
            f"loss={loss}",
        )
        assert cli.json(*args, actor="alice")["number"] == seed
    assert cli.json("promote", f"{REPO}:1", "--alias", "production")["version"] == 1

    # A policy, set and shown.
    cli.ok(
        "policy", "set", REPO, "--alias", "production",
        "--min", "accuracy=0.8", "--max", "loss=1.2",
        "--no-regression", "accuracy:0.01", "--no-regression", "loss", "--lower-is-better", "loss",
        "--approvals", "1",
        actor="admin",
    )  # fmt: skip
    shown = cli.json("policy", "show", REPO, "--alias", "production")
    assert shown["policy"] == {
        "min": {"accuracy": 0.8},
        "max": {"loss": 1.2},
        "no_regression": [
            {"metric": "accuracy", "tolerance": 0.01, "higher_is_better": True},
            {"metric": "loss", "tolerance": 0.0, "higher_is_better": False},
        ],
        "approvals": 1,
        "require_signature": False,
    }
    assert shown["updated_by"] == "admin"
    human = cli.ok("policy", "show", REPO)
    assert "production of acme/bot (set by admin" in human
    assert "accuracy >= 0.8" in human and "loss <= 1.2" in human
    assert "loss: no regression against the current holder (tolerance 0.0, lower is better)" in human
    bad = cli("policy", "set", REPO, "--alias", "production", "--min", "accuracy=nan")
    assert bad.returncode == 2 and "not a finite number" in bad.stderr

    # A promotion failing several rules: every one listed, nothing changed.
    error = cli.fails("promote", f"{REPO}:2", "--alias", "production")
    assert error == (
        "error: the policy of alias production of acme/bot refuses version 2 (4 rules failed): "
        "accuracy 0.79 < minimum 0.8; "
        "accuracy 0.79 regresses from 0.85 held by version 1 (tolerance 0.01); "
        "loss 1.1 regresses from 1.0 held by version 1 (lower is better, tolerance 0.0); "
        "0 of 1 approvals for production (approvals from the pusher alice do not count); nothing changed"
    )
    assert cli.json("show", f"{REPO}@production")["number"] == 1

    # Approvals: not by the pusher; idempotent; then the promotion passes.
    assert "alice pushed acme/bot:3 and cannot approve it" in cli.fails(
        "approve", f"{REPO}:3", "--alias", "production", actor="alice"
    )
    assert cli.ok(
        "approve", f"{REPO}:3", "--alias", "production", "--comment", "lgtm", actor="bob"
    ).strip() == ("bob approved moving production to acme/bot:3")
    again = cli.json("approve", f"{REPO}:3", "--alias", "production", actor="bob")
    assert (again["created"], again["comment"]) == (False, "lgtm")
    assert cli.json("promote", f"{REPO}:3", "--alias", "production")["version"] == 3

    # Rollback, then back up again, then a rollback --to a version that never held the alias.
    assert cli.ok("rollback", REPO, "--alias", "production", "--reason", "latency").startswith(
        "rolled back production of acme/bot: 3 -> 1"
    )
    assert cli.json("promote", f"{REPO}:3", "--alias", "production")["previous"] == 1
    assert "never held alias production" in cli.fails("rollback", REPO, "--alias", "production", "--to", "2")

    # Pulled (so cached) before it is yanked.
    cached_path = cli.ok("pull", f"{REPO}:3").strip()
    assert Path(cached_path, "adapter_model.safetensors").is_file()

    # Yank: refused on the holder of production, then with --rollback.
    error = cli.fails("yank", f"{REPO}:3", "--reason", "leaks PII", actor="sec")
    assert "alias production points to it" in error and "--rollback" in error
    yanked = cli.ok("yank", f"{REPO}:3", "--reason", "leaks PII", "--rollback", actor="sec")
    assert yanked.splitlines()[1] == "rolled back production: 3 -> 1"
    assert "was already yanked by sec" in cli.fails("yank", f"{REPO}:3", "--reason", "again", actor="sec")
    assert cli.json("show", f"{REPO}@production")["number"] == 1

    # Pulls of the yanked version: refused (the cached copy too) unless exact + --allow-yanked.
    error = cli.fails("pull", f"{REPO}:3")
    assert "acme/bot:3 was yanked by sec" in error and "leaks PII" in error and "--allow-yanked" in error
    allowed = cli.json("pull", f"{REPO}:3", "--allow-yanked")
    assert (allowed["number"], allowed["path"], allowed["yanked"]["reason"]) == (3, cached_path, "leaks PII")
    digest = allowed["digest"]
    assert "was yanked" in cli.fails("pull", f"{REPO}@{digest}")
    assert cli.json("pull", f"{REPO}@{digest}", "--allow-yanked", "-o", tmp_path / "out")["number"] == 3
    assert "was yanked" in cli.fails("verify", f"{REPO}:3")
    assert cli.json("verify", f"{REPO}:3", "--allow-yanked")["verified"] is True
    assert cli.json("pull", REPO)["number"] == 2  # the newest version that is not yanked
    assert cli.json("pull", f"{REPO}@production")["number"] == 1

    # Still readable for audit, with the reason.
    shown_version = cli.ok("show", f"{REPO}:3")
    assert any(line.startswith("yanked:   leaks PII (by sec, ") for line in shown_version.splitlines())
    assert "yanked" not in cli.ok("show", f"{REPO}:1")
    assert "is yanked" in cli.fails("promote", f"{REPO}:3", "--alias", "production")

    # A signature requirement refuses every promotion (nothing can be signed yet).
    cli.ok("policy", "set", REPO, "--alias", "canary", "--require-signature")
    error = cli.fails("promote", f"{REPO}:2", "--alias", "canary")
    assert "signature required: version 2 has no signature by a key of the namespace that is not" in error

    # Clearing the policy lifts it.
    cli.ok("policy", "clear", REPO, "--alias", "production")
    assert "production" not in cli.ok("policy", "show", REPO)
    assert cli.json("promote", f"{REPO}:2", "--alias", "production")["version"] == 2
    cli.ok("policy", "clear", REPO, "--alias", "canary")
    assert cli.ok("policy", "show", REPO).strip() == "acme/bot has no promotion policies"
    assert "has no policy" in cli.fails("policy", "clear", REPO, "--alias", "canary")

    # Every write of this story, in order, in the audit log (refusals included).
    actions = [e["action"] for e in reversed(cli.json("audit", REPO, "--limit", "100")["entries"])]
    assert actions == [
        "push", "push", "push", "alias.promote", "policy.set",
        "alias.promote.refused", "approve.refused", "approve", "alias.promote",
        "alias.rollback", "alias.promote", "alias.rollback.refused",
        "yank.refused", "alias.rollback", "yank", "yank.refused",
        "alias.promote.refused", "policy.set", "alias.promote.refused",
        "policy.delete", "alias.promote", "policy.delete", "policy.delete.refused",
    ]  # fmt: skip
