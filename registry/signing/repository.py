from __future__ import annotations

from sqlalchemy import and_, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.registry.models import Signature, SigningKey, utcnow


class SigningKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, namespace: str, key_id: str, public_key: str, name: str | None, *, actor: str
    ) -> tuple[SigningKey, bool]:
        """Register the key; ``(the existing row, False)`` if the namespace has it already (revoked or not).

        The unique constraint decides between two registrations racing, as for results.
        """
        row = SigningKey(namespace=namespace, key_id=key_id, public_key=public_key, name=name, actor=actor)
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:
            existing = self.get(namespace, key_id)
            if existing is None:
                raise
            return existing, False
        return row, True

    def get(self, namespace: str, key_id: str) -> SigningKey | None:
        statement = select(SigningKey).where(SigningKey.namespace == namespace, SigningKey.key_id == key_id)
        return self.session.scalars(statement).first()

    def for_namespace(self, namespace: str) -> list[SigningKey]:
        statement = select(SigningKey).where(SigningKey.namespace == namespace).order_by(SigningKey.id)
        return list(self.session.scalars(statement))

    def revoke(self, row: SigningKey, *, actor: str) -> bool:
        """Mark the key revoked; False (nothing changed) if it already was."""
        if row.revoked_at is not None:
            return False
        row.revoked_at, row.revoked_by = utcnow(), actor
        self.session.flush()
        return True


class SignatureRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, version_id: int, key_id: str, signature: str, *, actor: str) -> tuple[Signature, bool]:
        """Store the signature; ``(the existing one, False)`` if the key has signed the version before."""
        row = Signature(version_id=version_id, key_id=key_id, signature=signature, actor=actor)
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:
            existing = self.find(version_id, key_id)
            if existing is None:
                raise
            return existing, False
        return row, True

    def find(self, version_id: int, key_id: str) -> Signature | None:
        statement = select(Signature).where(Signature.version_id == version_id, Signature.key_id == key_id)
        return self.session.scalars(statement).first()

    def for_version(self, version_id: int, namespace: str) -> list[tuple[Signature, bool]]:
        """The version's signatures, oldest first, each with whether its key is revoked in ``namespace``."""
        statement = (
            select(Signature, SigningKey.revoked_at)
            .outerjoin(
                SigningKey, and_(SigningKey.namespace == namespace, SigningKey.key_id == Signature.key_id)
            )
            .where(Signature.version_id == version_id)
            .order_by(Signature.id)
        )
        return [(row, revoked_at is not None) for row, revoked_at in self.session.execute(statement)]

    def has_valid(self, version_id: int, namespace: str) -> bool:
        """Whether a key of ``namespace`` that is not revoked signed the version (signatures were verified
        when stored, so a key's signature stays good for as long as the key is)."""
        valid_key = exists().where(
            SigningKey.namespace == namespace,
            SigningKey.key_id == Signature.key_id,
            SigningKey.revoked_at.is_(None),
        )
        statement = select(Signature.id).where(Signature.version_id == version_id, valid_key).limit(1)
        return self.session.scalar(statement) is not None
