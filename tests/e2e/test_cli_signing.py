"""Signing through the real CLI against a real server: a key pair, registered in a namespace; a signed
push; and pulls with ``--require-signature`` that refuse (exit 3), before anything is marked valid in the
cache, a version that is unsigned, signed by a key that is not trusted, or signed by a revoked key."""

from __future__ import annotations

import json
import stat
from typing import Any

import pytest
from _support.adapters import make_adapter

from deltareg.client.signing import TRUSTED_KEYS_ENV

pytestmark = pytest.mark.slow

BASE = "tmv1:" + "ab" * 32
REPO = "signing/bot"


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _with_env(cli: Any, **env: str) -> Any:
    return type(cli)({**cli.env, **env}, cli.cache_dir, cli.server)


def _cached(cli: Any, digest: str) -> bool:
    """Whether the cache holds a folder for the version (a refused pull must leave none)."""
    return (cli.cache_dir / "versions" / digest.removeprefix("sha256:")).exists()


def test_signed_pushes_and_pulls_that_require_a_signature(cli, tmp_path):
    cli.env.pop(TRUSTED_KEYS_ENV, None)
    key, other = tmp_path / "release.key", tmp_path / "other.key"
    generated = cli("key", "generate", "-o", key, "--comment", "release")
    assert generated.returncode == 0, generated.stderr
    public_line = (tmp_path / "release.key.pub").read_text().strip()
    assert generated.stdout.splitlines()[0] == public_line
    key_id = generated.stdout.splitlines()[1].removeprefix("key id: ")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "PRIVATE" not in generated.stdout + generated.stderr
    again = cli("key", "generate", "-o", key)
    assert again.returncode == 1 and "already exists" in again.stderr
    other_id = _json(cli("key", "generate", "-o", other, "--json"))["key_id"]
    trusted = tmp_path / "trusted"
    trusted.write_text(f"# release keys\n{public_line}\n")

    # A push signed by a key that is not registered is refused before anything is uploaded.
    unregistered = cli("push", make_adapter(tmp_path / "v1", seed=1), REPO, "--base", BASE, "--sign-key", key)
    assert unregistered.returncode == 1 and "register it" in unregistered.stderr
    assert cli("show", REPO).returncode == 1  # nothing was pushed: the repo does not exist

    registered = _json(cli("key", "register", "signing", tmp_path / "release.key.pub", "--json"))
    assert (registered["key_id"], registered["name"], registered["created"]) == (key_id, "release", True)
    pushed = _json(cli("push", tmp_path / "v1", REPO, "--base", BASE, "--sign-key", key, "--json"))
    v1 = pushed["digest"]
    assert pushed["signature"]["key_id"] == key_id

    # Refused, and nothing marked valid in the cache: a key that is not trusted (flag or variable) ...
    untrusted = cli("pull", f"{REPO}:1", "--require-signature", "--trusted-keys", tmp_path / "other.key.pub")
    assert untrusted.returncode == 3, untrusted.stderr
    assert "no valid signature by a trusted key" in untrusted.stderr and other_id in untrusted.stderr
    by_env = _with_env(cli, **{TRUSTED_KEYS_ENV: str(tmp_path / "other.key.pub")})
    assert by_env("pull", f"{REPO}:1", "--require-signature").returncode == 3
    assert not _cached(cli, v1)
    # ... or no trusted key at all (a usage problem, exit 1).
    nothing = cli("pull", f"{REPO}:1", "--require-signature")
    assert nothing.returncode == 1 and TRUSTED_KEYS_ENV in nothing.stderr
    assert not _cached(cli, v1)

    # The signing key trusted, by flag or by variable: accepted.
    assert cli("pull", f"{REPO}:1", "--require-signature", "--trusted-keys", trusted).returncode == 0
    assert _cached(cli, v1)
    by_trusted_env = _with_env(cli, **{TRUSTED_KEYS_ENV: str(trusted)})
    assert by_trusted_env("verify", f"{REPO}:1", "--require-signature").returncode == 0

    # An unsigned version is refused, before the download and again once it is cached.
    v2 = _json(cli("push", make_adapter(tmp_path / "v2", seed=2), REPO, "--base", BASE, "--json"))["digest"]
    unsigned = cli("pull", f"{REPO}:2", "--require-signature", "--trusted-keys", trusted)
    assert unsigned.returncode == 3 and "is not signed" in unsigned.stderr
    assert not _cached(cli, v2)
    assert cli("pull", f"{REPO}:2").returncode == 0 and _cached(cli, v2)
    cached = cli("pull", f"{REPO}:2", "--require-signature", "--trusted-keys", trusted)
    assert cached.returncode == 3 and "is not signed" in cached.stderr
    folder = cli("pull", f"{REPO}:2").stdout.strip()
    assert cli("verify", folder, "--require-signature", "--trusted-keys", trusted).returncode == 3

    # Signed later with `deltareg sign`: accepted, and listed.
    signed = cli("sign", f"{REPO}:2", "--key", key)
    assert signed.returncode == 0 and f"signed {REPO}:2 {v2} with {key_id}" in signed.stdout
    assert cli("pull", f"{REPO}:2", "--require-signature", "--trusted-keys", trusted).returncode == 0
    listed = _json(cli("signatures", f"{REPO}:2", "--json"))
    assert [(s["key_id"], s["actor"], s["key_revoked"]) for s in listed] == [(key_id, "alice", False)]

    # A chain: every ancestor must be signed too; a signed child of an unsigned parent is refused.
    v3 = _json(cli("push", make_adapter(tmp_path / "v3", seed=3), REPO, "--base", BASE, "--json"))["digest"]
    child = make_adapter(tmp_path / "v4", seed=4)
    v4 = _json(
        cli("push", child, REPO, "--base", BASE, "--parent", f"{REPO}:3", "--sign-key", key, "--json")
    )["digest"]
    chain = cli("pull", f"{REPO}:4", "--require-signature", "--trusted-keys", trusted)
    assert chain.returncode == 3 and f"{REPO}:3 ({v3}) is not signed" in chain.stderr
    assert not _cached(cli, v3) and not _cached(cli, v4)
    assert cli("sign", f"{REPO}:3", "--key", key).returncode == 0
    assert cli("pull", f"{REPO}:4", "--require-signature", "--trusted-keys", trusted).returncode == 0
    assert _cached(cli, v3) and _cached(cli, v4)

    # Revoked in the registry: the client takes the registry's word for that (it can only refuse more).
    revoked = cli("key", "revoke", "signing", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert "REVOKED" in cli("key", "list", "signing").stdout
    assert "(key revoked)" in cli("signatures", f"{REPO}:1").stdout
    after = cli("pull", f"{REPO}:1", "--require-signature", "--trusted-keys", trusted)
    assert after.returncode == 3 and "(revoked)" in after.stderr
    merged = tmp_path / "merged"
    apply = cli("apply", f"{REPO}:1", "--base", tmp_path / "v1", "-o", merged, "--require-signature")
    assert apply.returncode == 1 and TRUSTED_KEYS_ENV in apply.stderr  # no trusted key: checked first
    apply = cli(
        "apply",
        f"{REPO}:1",
        "--base",
        tmp_path / "v1",
        "-o",
        merged,
        "--require-signature",
        "--trusted-keys",
        trusted,
    )
    assert apply.returncode == 3 and "no valid signature" in apply.stderr
    assert not merged.exists()


def test_a_wrong_key_file_is_a_clear_error(cli, tmp_path):
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    result = cli("sign", f"{REPO}:1", "--key", tmp_path / "bad.key")
    assert result.returncode == 1
    assert "not an unencrypted PEM private key" in result.stderr and "c2VjcmV0" not in result.stderr
    bad_public = cli("key", "register", "signing", tmp_path / "bad.key")
    assert bad_public.returncode == 1 and "private key" in bad_public.stderr
