"""Signing: public keys registered per namespace, and signatures of versions the registry verified.

A signature is stored only if it verifies, under a key of the version's namespace that is not revoked, as
a signature of the version's manifest digest (see deltareg.client.signing). Clients still verify for
themselves against the keys they trust; what the registry's check buys is that a promotion policy can
require a signature, and that a listed signature was good when it was added.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.errors import Conflict, InvalidInput, SignatureInvalid, SigningKeyNotFound
from deltareg.client.refs import validate_name_part
from deltareg.client.signing import PublicKey
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.models import Repo, Signature, SigningKey, Version
from deltareg.registry.signing.repository import SignatureRepository, SigningKeyRepository
from deltareg.registry.signing.schemas import (
    KeyList,
    KeyRegistered,
    KeyRevoked,
    SignatureAdded,
    SignatureList,
    SignRequest,
    check_key_id,
    key_out,
    signature_out,
)
from deltareg.registry.versions.repository import RepoRepository, VersionRepository


class SigningService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.keys = SigningKeyRepository(session)
        self.signatures = SignatureRepository(session)
        self.audit = AuditRepository(session)

    # ---- keys

    def register_key(self, namespace: str, key: PublicKey, name: str | None, *, actor: str) -> KeyRegistered:
        """Register ``key`` in ``namespace`` (which needs no repo yet); audited as ``key.register``.

        Registering the same key again returns the first registration (``created`` false, nothing
        audited). A revoked key stays revoked: registering it again is refused.

        Raises:
            InvalidName: the namespace is not a valid name.
            Conflict: the key was revoked in this namespace.
        """
        validate_name_part(namespace, "namespace")
        row, created = self.keys.add(namespace, key.key_id, key.base64, name, actor=actor)
        if row.revoked_at is not None:
            raise Conflict(
                f"key {key.key_id} was revoked in namespace {namespace} and cannot be registered again; "
                "generate a new key"
            )
        if created:
            self.audit.append(
                actor=actor,
                action="key.register",
                target=_key_target(namespace, key.key_id),
                repo=None,
                details={
                    "namespace": namespace,
                    "key_id": key.key_id,
                    "public_key": key.base64,
                    "name": name,
                },
            )
        return KeyRegistered(**key_out(row).model_dump(), created=created)

    def list_keys(self, namespace: str) -> KeyList:
        validate_name_part(namespace, "namespace")
        return KeyList(namespace=namespace, keys=[key_out(row) for row in self.keys.for_namespace(namespace)])

    def revoke_key(self, namespace: str, key_id: str, *, actor: str) -> KeyRevoked:
        """Revoke a key: its signatures stop counting (for policies; clients decide for themselves).
        Audited as ``key.revoke``; revoking again changes nothing (``changed`` false, nothing audited).

        Raises:
            InvalidInput: a malformed namespace or key id.
            SigningKeyNotFound: the namespace has no such key.
        """
        row = self._require_key(namespace, key_id)
        changed = self.keys.revoke(row, actor=actor)
        if changed:
            self.audit.append(
                actor=actor,
                action="key.revoke",
                target=_key_target(namespace, key_id),
                repo=None,
                details={"namespace": namespace, "key_id": key_id},
            )
        return KeyRevoked(**key_out(row).model_dump(), changed=changed)

    # ---- signatures

    def sign(
        self, namespace: str, name: str, number: int, request: SignRequest, *, actor: str
    ) -> SignatureAdded:
        """Add a signature of version ``number`` after verifying it; audited as ``version.sign``.

        The same signature again returns the first record (``created`` false, nothing audited).

        Raises:
            RepoNotFound, VersionNotFound: no such version.
            SigningKeyNotFound: the namespace has no such key.
            InvalidInput: the key was revoked.
            SignatureInvalid: the signature is not the key's signature of the version's manifest digest.
            Conflict: the key already signed the version with a different signature.
        """
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        key = self._require_key(repo.namespace, request.key_id)
        if key.revoked_at is not None:
            raise InvalidInput(
                f"key {key.key_id} of namespace {repo.namespace} was revoked; sign with a registered key"
            )
        if not PublicKey.from_base64(key.public_key).verifies(version.digest, request.signature):
            raise SignatureInvalid(
                f"the signature is not a signature of {repo.full_name}:{number} ({version.digest}) by key "
                f"{key.key_id}; nothing was stored"
            )
        row, created = self.signatures.add(version.id, key.key_id, request.signature, actor=actor)
        if row.signature != request.signature:
            raise Conflict(
                f"key {key.key_id} already signed {repo.full_name}:{number} with another signature; "
                "one signature per key and version is kept"
            )
        if created:
            self.audit.append(
                actor=actor,
                action="version.sign",
                target=f"{repo.full_name}:{number}",
                repo=repo.full_name,
                details={"version": number, "digest": version.digest, "key_id": key.key_id},
            )
        return _added(repo, version, row, created)

    def list_signatures(self, namespace: str, name: str, number: int) -> SignatureList:
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        rows = self.signatures.for_version(version.id, repo.namespace)
        return SignatureList(
            repo=repo.full_name,
            number=number,
            digest=version.digest,
            signatures=[signature_out(row, revoked) for row, revoked in rows],
        )

    def is_signed(self, repo: Repo, version: Version) -> bool:
        """Whether a key of the repo's namespace that is not revoked signed the version (for policies)."""
        return self.signatures.has_valid(version.id, repo.namespace)

    def _require_key(self, namespace: str, key_id: str) -> SigningKey:
        validate_name_part(namespace, "namespace")
        check_key_id(key_id)
        row = self.keys.get(namespace, key_id)
        if row is None:
            raise SigningKeyNotFound(
                f"namespace {namespace} has no key {key_id}; register it with deltareg key register"
            )
        return row


def _key_target(namespace: str, key_id: str) -> str:
    return f"{namespace}/keys/{key_id}"


def _added(repo: Repo, version: Version, row: Signature, created: bool) -> SignatureAdded:
    return SignatureAdded(
        **signature_out(row, key_revoked=False).model_dump(),
        repo=repo.full_name,
        number=version.number,
        digest=version.digest,
        created=created,
    )
