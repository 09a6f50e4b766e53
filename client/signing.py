"""Ed25519 signatures over manifest digests: keys, signing, verifying, and the client's trusted keys.

A signature covers ``deltareg.signature.v1\\n`` followed by the manifest digest (``sha256:<hex>``), so it
says "this exact version" and cannot be taken for a signature of anything else made with the same key.
A public key is written as one line, ``ed25519 <base64 of the 32 raw bytes> [comment]``; PEM
(SubjectPublicKeyInfo) is accepted when reading. Its id, ``ed25519:`` + the first 32 hex digits of the
sha256 of the raw key, names it in the registry. A private key is an unencrypted PKCS#8 PEM file, written
readable by its owner only; its bytes are never printed or put in an error message.

No torch here: pull and verify use this module on machines that never apply.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deltareg.client.errors import InvalidInput
from deltareg.client.refs import validate_digest

SIGNATURE_CONTEXT = b"deltareg.signature.v1\n"
KEY_TYPE = "ed25519"
KEY_ID_PREFIX = "ed25519:"
KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
TRUSTED_KEYS_ENV = "DELTAREG_TRUSTED_KEYS"
MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is a few hundred bytes; a trusted-keys file a few hundred keys
MAX_COMMENT = 128
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", re.DOTALL)


def message(digest: str) -> bytes:
    """The bytes a signature of the manifest ``digest`` covers."""
    return SIGNATURE_CONTEXT + validate_digest(digest).encode("ascii")


def decode_base64(text: str, size: int, what: str) -> bytes:
    """``text`` as strict base64 of exactly ``size`` bytes; InvalidInput naming ``what`` otherwise."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise InvalidInput(f"{what} must be base64 of exactly {size} bytes, not {len(raw)}")
    return raw


def key_id_of(raw: bytes) -> str:
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def is_key_id(text: str) -> bool:
    return KEY_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (its 32 raw bytes) and an optional comment (who or what it is for)."""

    raw: bytes
    comment: str | None = None

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise InvalidInput(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(self.raw)}")

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def line(self) -> str:
        """The one-line form: ``ed25519 <base64> [comment]``."""
        return f"{KEY_TYPE} {self.base64}" + (f" {self.comment}" if self.comment else "")

    def verifies(self, digest: str, signature: str) -> bool:
        """Whether ``signature`` (base64) is this key's signature of the manifest ``digest``."""
        try:
            raw = decode_base64(signature, SIGNATURE_BYTES, "the signature")
            Ed25519PublicKey.from_public_bytes(self.raw).verify(raw, message(digest))
        except (InvalidSignature, InvalidInput):
            return False
        return True

    @classmethod
    def from_base64(cls, text: str, comment: str | None = None) -> PublicKey:
        return cls(decode_base64(text, PUBLIC_KEY_BYTES, "the public key"), comment)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """A public key in the one-line form or as PEM; InvalidInput saying which form was expected."""
        stripped = text.strip()
        if stripped.startswith("-----BEGIN"):
            return _public_from_pem(stripped)
        parts = stripped.split(None, 2)
        if len(parts) < 2 or parts[0] != KEY_TYPE:
            raise InvalidInput(
                f"not an Ed25519 public key: expected '{KEY_TYPE} <base64> [comment]' or a PEM public key"
            )
        comment = parts[2].strip()[:MAX_COMMENT] if len(parts) == 3 else None
        return cls.from_base64(parts[1], comment or None)


def _public_from_pem(text: str) -> PublicKey:
    if "PRIVATE KEY" in text:
        raise InvalidInput("this is a private key; give the public key (the .pub file)")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        raise InvalidInput("not a valid PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput("the PEM public key is not an Ed25519 key")
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


@dataclass(frozen=True)
class SigningKey:
    """A private key loaded for signing, with its public half."""

    private: Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, digest: str) -> str:
        """The base64 signature of the manifest ``digest``."""
        return base64.b64encode(self.private.sign(message(digest))).decode("ascii")


def _signing_key(private: Ed25519PrivateKey, comment: str | None = None) -> SigningKey:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(private, PublicKey(raw, comment))


def generate_key(path: str | os.PathLike[str], *, comment: str | None = None) -> SigningKey:
    """Create a key pair: the private key at ``path`` (PKCS#8 PEM, mode 0600) and the public key line at
    ``path.pub``. Neither file may exist already (a key is never overwritten)."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise InvalidInput(f"{existing} already exists; a key file is never overwritten")
    if comment is not None and (not comment.isprintable() or len(comment) > MAX_COMMENT):
        raise InvalidInput(f"the key comment must be printable text of at most {MAX_COMMENT} characters")
    key = _signing_key(Ed25519PrivateKey.generate(), comment)
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: another process creating the file meanwhile makes this fail rather than share the key.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    with open(public_path, "x", encoding="ascii") as handle:
        handle.write(key.public.line() + "\n")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The private key in ``path`` (PKCS#8 PEM, unencrypted); InvalidInput if it is not one."""
    data = _read_small(Path(path), "key file")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # TypeError: an encrypted key. Never echo the file: it may hold key material.
        raise InvalidInput(
            f"{path} is not an unencrypted PEM private key (make one with deltareg key generate)"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidInput(f"{path} holds a private key that is not Ed25519")
    return _signing_key(private)


def read_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """The public key in ``path`` (one-line form or PEM)."""
    text = _read_small(Path(path), "public key file").decode("ascii", errors="replace")
    try:
        return PublicKey.parse(text)
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc.message}") from None


def read_trusted_keys(path: str | os.PathLike[str]) -> list[PublicKey]:
    """The keys in a trusted-keys file: one public key per line (``#`` starts a comment line), or PEM
    public key blocks. A malformed line is an error naming the file and line, not a key to skip."""
    text = _read_small(Path(path), "trusted-keys file").decode("ascii", errors="replace")
    keys = [_public_from_pem(block.group(0)) for block in _PEM_BLOCK.finditer(text)]
    for number, line in enumerate(_PEM_BLOCK.sub("", text).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            keys.append(PublicKey.parse(stripped))
        except InvalidInput as exc:
            raise InvalidInput(f"{path} line {number}: {exc.message}") from None
    return keys


def trusted_keys_from_env(environ: Mapping[str, str] | None = None) -> list[PublicKey]:
    """The keys of the files ``DELTAREG_TRUSTED_KEYS`` names (one path, or several joined by
    ``os.pathsep``); empty when it is unset."""
    value = (os.environ if environ is None else environ).get(TRUSTED_KEYS_ENV, "")
    return [key for path in value.split(os.pathsep) if path.strip() for key in read_trusted_keys(path)]


def resolve_trusted_keys(given: Iterable[PublicKey | str] | None) -> list[PublicKey]:
    """The keys a pull trusts: ``given`` (PublicKey objects or public key text) or else those of
    ``DELTAREG_TRUSTED_KEYS``; InvalidInput when that leaves none (nothing could ever verify)."""
    keys = [k if isinstance(k, PublicKey) else PublicKey.parse(k) for k in given or ()]
    if not keys:
        keys = trusted_keys_from_env()
    if not keys:
        raise InvalidInput(
            f"a signature is required but no key is trusted: pass trusted keys (--trusted-keys FILE) "
            f"or set {TRUSTED_KEYS_ENV} to a trusted-keys file"
        )
    return keys


def trusted_signer(
    digest: str, signatures: Iterable[Mapping[str, object]], trusted: Sequence[PublicKey]
) -> PublicKey | None:
    """The first trusted key that one of ``signatures`` (``key_id``, ``signature``, ``key_revoked``)
    verifies under for the manifest ``digest``; None if there is none.

    Each signature is verified here, whatever the registry said about it. The registry's word is taken
    only to refuse more: a signature whose key it lists as revoked does not count.
    """
    by_id = {key.key_id: key for key in trusted}
    for entry in signatures:
        if entry.get("key_revoked"):
            continue
        key = by_id.get(str(entry.get("key_id")))
        signature = entry.get("signature")
        if key is not None and isinstance(signature, str) and key.verifies(digest, signature):
            return key
    return None


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInput(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInput(f"{what} {path} is a folder, not a file") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidInput(f"{what} {path} is over {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return data
