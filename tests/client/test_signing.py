"""Ed25519 signing of manifest digests (deltareg.client.signing): key files, signatures that cover exactly
one digest under exactly one key, and trusted-key files."""

from __future__ import annotations

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deltareg.client.errors import InvalidInput, InvalidReference
from deltareg.client.signing import (
    TRUSTED_KEYS_ENV,
    PublicKey,
    generate_key,
    is_key_id,
    load_signing_key,
    message,
    read_public_key,
    read_trusted_keys,
    resolve_trusted_keys,
    trusted_keys_from_env,
    trusted_signer,
)

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def key(tmp_path):
    return generate_key(tmp_path / "signing.key", comment="release bot")


def test_generate_writes_a_private_pem_for_the_owner_only_and_the_public_line(tmp_path, key):
    private = tmp_path / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    line = (tmp_path / "signing.key.pub").read_text().strip()
    assert line == f"ed25519 {key.public.base64} release bot"
    assert read_public_key(tmp_path / "signing.key.pub") == key.public
    assert is_key_id(key.key_id) and key.key_id.startswith("ed25519:") and len(key.key_id) == 8 + 32


def test_generate_never_overwrites(tmp_path, key):
    before = (tmp_path / "signing.key").read_bytes()
    with pytest.raises(InvalidInput, match="already exists"):
        generate_key(tmp_path / "signing.key")
    assert (tmp_path / "signing.key").read_bytes() == before
    (tmp_path / "other.key.pub").write_text("something\n")
    with pytest.raises(InvalidInput, match="other.key.pub already exists"):
        generate_key(tmp_path / "other.key")
    assert not (tmp_path / "other.key").exists()


def test_a_loaded_key_signs_what_its_public_key_verifies(tmp_path, key):
    loaded = load_signing_key(tmp_path / "signing.key")
    assert loaded.public == PublicKey(key.public.raw)
    signature = loaded.sign(DIGEST)
    assert len(base64.b64decode(signature)) == 64
    assert key.public.verifies(DIGEST, signature)
    assert (
        trusted_signer(DIGEST, [{"key_id": key.key_id, "signature": signature}], [key.public]) == key.public
    )


def test_the_signed_message_is_domain_separated():
    assert message(DIGEST) == b"deltareg.signature.v1\n" + DIGEST.encode()
    with pytest.raises(InvalidReference):
        message("sha256:nothex")


def test_a_signature_of_the_bare_digest_does_not_verify():
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    bare = base64.b64encode(private.sign(DIGEST.encode())).decode()
    assert not PublicKey(raw).verifies(DIGEST, bare)


def test_tampering_is_detected(tmp_path, key):
    signature = key.sign(DIGEST)
    assert not key.public.verifies(OTHER_DIGEST, signature)  # a signature of another digest
    flipped = bytearray(base64.b64decode(signature))
    flipped[10] ^= 0x01
    assert not key.public.verifies(DIGEST, base64.b64encode(bytes(flipped)).decode())
    other = generate_key(tmp_path / "other.key")
    assert not other.public.verifies(DIGEST, signature)  # a wrong key
    assert not key.public.verifies(DIGEST, "not base64!")
    assert not key.public.verifies(DIGEST, base64.b64encode(b"x" * 63).decode())


def test_trusted_signer_checks_every_signature_and_trusts_only_given_keys(tmp_path, key):
    other = generate_key(tmp_path / "other.key")
    good = {"key_id": key.key_id, "signature": key.sign(DIGEST)}
    by_other = {"key_id": other.key_id, "signature": other.sign(DIGEST)}
    # A registry claiming the trusted key made another key's signature does not make it verify.
    forged = {"key_id": key.key_id, "signature": other.sign(DIGEST)}
    assert trusted_signer(DIGEST, [by_other], [key.public]) is None
    assert trusted_signer(DIGEST, [forged], [key.public]) is None
    assert trusted_signer(DIGEST, [], [key.public]) is None
    assert trusted_signer(DIGEST, [forged, by_other, good], [key.public]) == key.public
    assert trusted_signer(OTHER_DIGEST, [good], [key.public]) is None
    assert trusted_signer(DIGEST, [{**good, "key_revoked": True}], [key.public]) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "not an unencrypted PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an unencrypted PEM"),
        (b"ed25519 AAAA", "not an unencrypted PEM private key"),
    ],
)
def test_a_malformed_private_key_file_is_refused_without_echoing_it(tmp_path, content, problem):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=problem) as caught:
        load_signing_key(path)
    assert "AAAA" not in str(caught.value)


def test_other_private_keys_are_refused_without_echoing_them(tmp_path, key):
    secret = Ed25519PrivateKey.generate()
    encrypted = secret.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    with pytest.raises(InvalidInput, match="not an unencrypted PEM private key"):
        load_signing_key(tmp_path / "encrypted.key")
    with pytest.raises(InvalidInput, match="does not exist"):
        load_signing_key(tmp_path / "missing.key")
    # A private key given where a public key is expected: refused, and its bytes are not shown.
    pem = (tmp_path / "signing.key").read_text()
    with pytest.raises(InvalidInput, match="this is a private key") as caught:
        read_public_key(tmp_path / "signing.key")
    assert pem.splitlines()[1] not in str(caught.value)


def test_public_keys_are_read_as_a_line_or_as_pem(key):
    pem = (
        Ed25519PrivateKey.from_private_bytes(
            key.private.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        )
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert PublicKey.parse(pem).raw == key.public.raw
    assert PublicKey.parse(f"  ed25519 {key.public.base64}\n").raw == key.public.raw
    for bad in ("ssh-rsa AAAA", f"ed25519 {key.public.base64[:-4]}", "ed25519", "ed25519 !!!!"):
        with pytest.raises(InvalidInput):
            PublicKey.parse(bad)


def test_a_trusted_keys_file_has_one_key_a_line_and_comments(tmp_path, key):
    other = generate_key(tmp_path / "other.key")
    path = tmp_path / "trusted"
    path.write_text(f"# release keys\n\n{key.public.line()}\n   # another\n{other.public.line()}\n")
    assert [k.raw for k in read_trusted_keys(path)] == [key.public.raw, other.public.raw]
    path.write_text(f"{key.public.line()}\nnot a key\n")
    with pytest.raises(InvalidInput, match="trusted line 2"):
        read_trusted_keys(path)


def test_trusted_keys_come_from_the_environment_variable(tmp_path, key, monkeypatch):
    other = generate_key(tmp_path / "other.key")
    (tmp_path / "a").write_text(key.public.line() + "\n")
    (tmp_path / "b").write_text(other.public.line() + "\n")
    environ = {TRUSTED_KEYS_ENV: f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"}
    assert [k.raw for k in trusted_keys_from_env(environ)] == [key.public.raw, other.public.raw]
    assert trusted_keys_from_env({}) == []

    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "b"))
    assert [k.raw for k in resolve_trusted_keys(None)] == [other.public.raw]
    assert [k.raw for k in resolve_trusted_keys([key.public.line()])] == [key.public.raw]  # given wins
    monkeypatch.delenv(TRUSTED_KEYS_ENV)
    with pytest.raises(InvalidInput, match=TRUSTED_KEYS_ENV):
        resolve_trusted_keys(None)
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="does not exist"):
        resolve_trusted_keys(None)
