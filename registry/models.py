"""ORM models (SQLAlchemy 2.0, typed) of the registry database; Alembic migrations mirror them.

One module on purpose: models are few, and the naming convention on the shared MetaData gives every
constraint a stable name for Alembic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

DIGEST_LENGTH = len("sha256:") + 64
FINGERPRINT_LENGTH = len("tmv1:") + 64
NAME_PART_LENGTH = 64
ACTOR_LENGTH = 256
TOKEN_NAME_LENGTH = 64
EPOCH = "1970-01-01 00:00:00"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    SQLite keeps no offset and hands back naive datetimes; they were written as UTC, so say so on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Blob(Base):
    """A content-addressed file in the blob store, recorded once its bytes were verified."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When a push last said it will reference this blob (upload, upload plan, complete). Garbage
    # collection removes an unreferenced blob only once this is older than the grace period.
    # The server default only fills rows that existed before the column (migration 0003 then copies
    # created_at); the application always sets it.
    last_used_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=text(f"'{EPOCH}'"), index=True
    )


class Repo(Base):
    """``namespace/name``: one line of versions."""

    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(NAME_PART_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_PART_LENGTH))
    # The last version number handed out; bumped atomically, so numbers are never reused.
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class Version(Base):
    """An immutable version: its manifest (canonical JSON) and the files it names."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("repo_id", "number"), UniqueConstraint("repo_id", "digest"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"))
    number: Mapped[int] = mapped_column(Integer)
    # Indexed on its own too: parents are looked up by digest across repos.
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), index=True)
    manifest: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    base_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH), index=True)
    # Indexed: lineage finds a version's children by their parent's digest.
    parent_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Who pushed it: approvals for a promotion must come from someone else.
    pushed_by: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    # A yanked version stays readable for audit; no alias may point to it and pulls refuse it unless
    # it is named exactly and yanked versions are allowed.
    yanked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    yank_reason: Mapped[str | None] = mapped_column(Text)
    yanked_by: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))


class VersionFile(Base):
    """One file of a version: its path in the version and the blob that holds its bytes."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    # Indexed: garbage collection asks "does any file reference this blob?" for every candidate.
    blob_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class Eval(Base):
    """A score attached to a version: metric, finite value, dataset and its revision, eval-suite version,
    who recorded it and when."""

    __tablename__ = "evals"
    # Search: "versions where accuracy >= 0.8" is a range scan on (name, value); "the newest score of a
    # metric" probes (version_id, name, id); "scores on dataset D" probes dataset.
    __table_args__ = (
        Index("ix_evals_name_value", "name", "value"),
        Index("ix_evals_version_id_name_id", "version_id", "name", "id"),
        Index("ix_evals_dataset", "dataset"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    dataset: Mapped[str | None] = mapped_column(String(256))
    dataset_revision: Mapped[str | None] = mapped_column(String(256))
    suite_version: Mapped[str | None] = mapped_column(String(128))
    actor: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExpectedResult(Base):
    """The base fingerprint of the model a version yields when applied to its base in one dtype.

    Recorded once per (version, base dtype) and never changed: ``apply --expect`` checks against it.
    """

    __tablename__ = "expected_results"
    __table_args__ = (UniqueConstraint("version_id", "base_dtype"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    # A safetensors dtype name: F16, BF16, F32, F64.
    base_dtype: Mapped[str] = mapped_column(String(8))
    fingerprint: Mapped[str] = mapped_column(String(80))
    actor: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


KEY_ID_LENGTH = 48  # "ed25519:" + 32 hex digits, with room for another key type's prefix


class SigningKey(Base):
    """An Ed25519 public key registered in a namespace: signatures by it count for the namespace's repos.

    Never deleted: a revoked key keeps its row (and its signatures stay listed) but no longer counts.
    """

    __tablename__ = "signing_keys"
    __table_args__ = (UniqueConstraint("namespace", "key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(NAME_PART_LENGTH))
    key_id: Mapped[str] = mapped_column(String(KEY_ID_LENGTH))
    # Base64 of the 32 raw key bytes (44 characters).
    public_key: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128))
    actor: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))


class Signature(Base):
    """A signature of a version's manifest digest, verified by the registry against a registered key of
    the version's namespace before it was stored (see deltareg.client.signing for what is signed)."""

    __tablename__ = "signatures"
    __table_args__ = (UniqueConstraint("version_id", "key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    key_id: Mapped[str] = mapped_column(String(KEY_ID_LENGTH))
    # Base64 of the 64 raw signature bytes (88 characters).
    signature: Mapped[str] = mapped_column(String(96))
    actor: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


ALIAS_LENGTH = 64


class Alias(Base):
    """A movable name on a repo (``production``) pointing at one of its versions.

    Moved only by compare-and-swap in the database (see deltareg.registry.aliases.repository), so two
    replicas moving the same alias cannot both win.
    """

    __tablename__ = "aliases"

    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(ALIAS_LENGTH), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AliasMove(Base):
    """One move of an alias, appended in the transaction that moved it: the alias history."""

    __tablename__ = "alias_moves"
    # "Where did this alias point at time T" reads the newest move at or before T.
    __table_args__ = (Index("ix_alias_moves_repo_id_alias_created_at", "repo_id", "alias", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"))
    alias: Mapped[str] = mapped_column(String(ALIAS_LENGTH))
    # None when the move created the alias.
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AliasPolicy(Base):
    """The promotion policy of one alias of a repo, as JSON (see deltareg.registry.policies.schemas)."""

    __tablename__ = "alias_policies"

    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(ALIAS_LENGTH), primary_key=True)
    policy: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Approval(Base):
    """One person's approval of moving an alias to a version; counted by a policy's approvals rule."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("version_id", "alias", "actor"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    alias: Mapped[str] = mapped_column(String(ALIAS_LENGTH))
    actor: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEntry(Base):
    """One entry of the append-only audit log, chained: ``entry_hash`` covers the entry and ``prev_hash``.

    Appended in the transaction of the write it records (see deltareg.registry.audit.repository), so a
    write and its entry commit together or not at all. Editing or deleting a row breaks the chain at
    that row, which ``deltareg audit verify`` reports.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    action: Mapped[str] = mapped_column(String(64))
    # ``namespace/name`` of the repo concerned (None for registry-wide actions), for listing by repo.
    repo: Mapped[str | None] = mapped_column(String(2 * NAME_PART_LENGTH + 1), index=True)
    target: Mapped[str] = mapped_column(String(512))
    # Canonical JSON (RFC 8785) text, hashed exactly as stored.
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    entry_hash: Mapped[str] = mapped_column(String(DIGEST_LENGTH), unique=True)


class ApiToken(Base):
    """An API token: who it is (the actor its requests record), what it may do, until when.

    Only the SHA-256 of the secret is stored; the secret is shown once, when the token is created.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(TOKEN_NAME_LENGTH))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, sorted
    namespaces: Mapped[str] = mapped_column(Text)  # comma-separated patterns ("*", "acme", "team-*")
    created_by: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))


WEBHOOK_URL_LENGTH = 2048


class Webhook(Base):
    """A receiver subscribed to events of one repo (``namespace/name``, matched against audit entries).

    The secret signs every payload (HMAC-SHA256), so it is kept as given: shown once when created, never
    listed. Deleting a webhook only deactivates it, so its delivery log stays readable.
    """

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo: Mapped[str] = mapped_column(String(2 * NAME_PART_LENGTH + 1), index=True)
    url: Mapped[str] = mapped_column(String(WEBHOOK_URL_LENGTH))
    secret: Mapped[str] = mapped_column(String(256))
    events: Mapped[str] = mapped_column(Text)  # JSON list of event names, sorted
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook: queued in the transaction of the write (an outbox), then sent by the
    delivery worker until the receiver answers 2xx or the attempts run out."""

    __tablename__ = "webhook_deliveries"
    # The worker's "due deliveries" is a range scan on (status, next_attempt_at); a webhook's log is read
    # newest first by (webhook_id, audit_entry_id).
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id_audit_entry_id", "webhook_id", "audit_entry_id"),
    )

    # A UUID: sent as X-Deltareg-Delivery, the same on every attempt, so receivers can drop repeats.
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"))
    event: Mapped[str] = mapped_column(String(64))
    audit_entry_id: Mapped[int] = mapped_column(ForeignKey("audit_log.id"))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body sent
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the worker may next send it: due now when queued, pushed forward by a lease while a worker
    # sends it, then by the backoff after a failure.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)  # of the latest failed attempt
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
