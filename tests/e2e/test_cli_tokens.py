"""Tokens through the real CLI and a real server: the embedded default's first admin token found by the CLI
on the same machine, anonymous reads there, and create / use / revoke with scopes and namespaces."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _support.adapters import make_adapter
from _support.servers import free_port, wait_healthy

pytestmark = pytest.mark.slow
BASE = "tmv1:" + "cd" * 32
DELTAREG = str(Path(sys.executable).with_name("deltareg"))


def run(env: dict[str, str], *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DELTAREG, *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def test_the_embedded_default_hands_its_admin_token_to_the_local_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DELTAREG_TOKEN", "DELTAREG_BOOTSTRAP_TOKEN")}
    env["DELTAREG_CONFIG_DIR"] = str(tmp_path / "config")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [DELTAREG, "serve", "--port", str(port), "--data-dir", tmp_path / "data"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_healthy(url, server, log)
        assert "created an admin token" in log.read_text()
        token_file = tmp_path / "data" / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        credentials = tmp_path / "config" / "credentials.json"
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

        cli = {**env, "DELTAREG_URL": url, "DELTAREG_CACHE_DIR": str(tmp_path / "cache")}
        me = json.loads(run(cli, "token", "whoami", "--json").stdout)
        assert (me["name"], me["scopes"]) == ("admin", ["admin", "promote", "read", "write"])
        assert (
            run(cli, "push", make_adapter(tmp_path / "a", seed=1), "acme/bot", "--base", BASE).returncode == 0
        )

        stranger = {**cli, "DELTAREG_CONFIG_DIR": str(tmp_path / "elsewhere")}  # no stored token
        assert json.loads(run(stranger, "token", "whoami", "--json").stdout)["name"] == "anonymous"
        assert run(stranger, "show", "acme/bot:1").returncode == 0  # anonymous reads: embedded default
        refused = run(stranger, "push", make_adapter(tmp_path / "b", seed=2), "acme/bot", "--base", BASE)
        assert refused.returncode == 1 and "needs an API token with the 'write' scope" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=15)
    # The secret is in the two 0600 files, never in the server's output.
    assert token_file.read_text().strip() in credentials.read_text()
    assert token_file.read_text().strip() not in log.read_text()


def test_create_use_and_revoke_tokens(cli, tmp_path):
    made = cli("token", "create", "ci-bot", "--scope", "write", "--namespace", "acme", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert (created["name"], created["scopes"], created["namespaces"]) == ("ci-bot", ["write"], ["acme"])
    bot = {**cli.env, "DELTAREG_TOKEN": created["token"]}

    pushed = run(bot, "push", make_adapter(tmp_path / "a", seed=3), "acme/tok", "--base", BASE, "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["pushed_by"] == "ci-bot"  # the actor is the token's name
    promote = run(bot, "promote", "acme/tok:1", "--alias", "production")
    assert promote.returncode == 1 and "needs 'promote'" in promote.stderr
    elsewhere = run(bot, "push", make_adapter(tmp_path / "b", seed=4), "other/tok", "--base", BASE)
    assert elsewhere.returncode == 1 and "not on namespace 'other'" in elsewhere.stderr

    listed = json.loads(cli("token", "list", "--json").stdout)
    assert created["token"] not in json.dumps(listed)  # secrets are shown once, never listed
    assert cli("token", "revoke", str(created["id"])).returncode == 0
    after = run(bot, "show", "acme/tok:1")
    assert after.returncode == 1 and "was revoked" in after.stderr
    audit = cli("audit", "--json").stdout
    assert created["token"] not in audit
    actions = [e["action"] for e in json.loads(audit)["entries"]]
    assert "token.create" in actions and "token.revoke" in actions
    # Secrets hygiene: the server's log (access lines, errors) never holds a secret or its hash.
    logs = "".join(p.read_text(errors="replace") for p in cli.server.data_dir.parent.glob("server-*.log"))
    assert "POST /api/v1/tokens" in logs  # it is the log of this server's requests
    for secret in (created["token"], cli.env["DELTAREG_TOKEN"]):
        assert secret not in logs and hashlib.sha256(secret.encode()).hexdigest() not in logs
