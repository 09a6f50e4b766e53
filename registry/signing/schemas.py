from __future__ import annotations

import json
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltareg.client.errors import InvalidInput
from deltareg.client.signing import (
    MAX_COMMENT,
    SIGNATURE_BYTES,
    PublicKey,
    decode_base64,
    is_key_id,
)
from deltareg.registry.body import describe_errors
from deltareg.registry.models import Signature, SigningKey

Model = TypeVar("Model", bound=BaseModel)
KEY_ID_HELP = "'ed25519:' followed by 32 lower-case hex digits"


class RegisterKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(
        max_length=64 + MAX_COMMENT,
        description="the Ed25519 public key: base64 of its 32 raw bytes, or 'ed25519 <base64> [comment]'",
    )
    name: str | None = Field(default=None, max_length=MAX_COMMENT, description="what or whom the key is for")


class SignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(max_length=48, description=KEY_ID_HELP)
    signature: str = Field(
        max_length=4 * SIGNATURE_BYTES,
        description="base64 of the 64-byte Ed25519 signature of 'deltareg.signature.v1\\n' + manifest digest",
    )


class KeyOut(BaseModel):
    namespace: str
    key_id: str
    public_key: str = Field(description="base64 of the 32 raw key bytes")
    name: str | None
    actor: str | None = Field(description="who registered it")
    created_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None


class KeyRegistered(KeyOut):
    created: bool = Field(description="false: the key was registered before; nothing changed")


class KeyRevoked(KeyOut):
    changed: bool = Field(description="false: the key was revoked before; nothing changed")


class KeyList(BaseModel):
    namespace: str
    keys: list[KeyOut] = Field(description="oldest first, revoked ones included")


class SignatureOut(BaseModel):
    key_id: str
    signature: str = Field(description="base64 of the 64 signature bytes")
    actor: str | None = Field(description="who added it")
    created_at: datetime
    key_revoked: bool = Field(description="the key was revoked since: the signature no longer counts")


class SignatureAdded(SignatureOut):
    repo: str
    number: int
    digest: str
    created: bool = Field(description="false: the same signature was added before; nothing changed")


class SignatureList(BaseModel):
    repo: str
    number: int
    digest: str
    signatures: list[SignatureOut] = Field(description="oldest first")


def key_out(row: SigningKey) -> KeyOut:
    return KeyOut(
        namespace=row.namespace,
        key_id=row.key_id,
        public_key=row.public_key,
        name=row.name,
        actor=row.actor,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
    )


def signature_out(row: Signature, key_revoked: bool) -> SignatureOut:
    return SignatureOut(
        key_id=row.key_id,
        signature=row.signature,
        actor=row.actor,
        created_at=row.created_at,
        key_revoked=key_revoked,
    )


def check_key_id(key_id: str) -> str:
    if not is_key_id(key_id):
        raise InvalidInput(f"invalid key id {key_id[:64]!r}: expected {KEY_ID_HELP}")
    return key_id


def parse_register_request(raw: bytes) -> tuple[PublicKey, str | None]:
    """The public key and name of a ``POST .../keys`` body; InvalidInput saying what is wrong."""
    request = _parse(raw, RegisterKeyRequest, '{"public_key": "<base64>", "name": "..."}')
    text = request.public_key.strip()
    key = PublicKey.parse(text) if text.startswith("ed25519 ") else PublicKey.from_base64(text)
    name = request.name if request.name is not None else key.comment
    if name is not None and (not name.isprintable() or not name.strip()):
        raise InvalidInput("the key name must be printable text, not blank")
    return PublicKey(key.raw), name


def parse_sign_request(raw: bytes) -> SignRequest:
    """The key id and signature of a ``POST .../signatures`` body; the signature is decoded once here so
    that a malformed one is refused before anything is looked up."""
    request = _parse(raw, SignRequest, '{"key_id": "ed25519:...", "signature": "<base64>"}')
    check_key_id(request.key_id)
    decode_base64(request.signature, SIGNATURE_BYTES, "the signature")
    return request


def _parse(raw: bytes, model: type[Model], shape: str) -> Model:
    """Parsed here rather than by FastAPI so that the refusal is audited (the route watches first)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput(f"invalid request body: expected JSON {shape}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid request body: {describe_errors(exc.errors())}") from None
