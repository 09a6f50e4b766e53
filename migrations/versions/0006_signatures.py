"""Signing: Ed25519 public keys registered per namespace, and signatures of versions by them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)  # UTC (models.UTCDateTime)
ACTOR = sa.String(length=256)
KEY_ID = sa.String(length=48)


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("key_id", KEY_ID, nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("actor", ACTOR, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.Column("revoked_by", ACTOR, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signing_keys")),
        # Also the index for "the keys of a namespace" (namespace is its first column).
        sa.UniqueConstraint("namespace", "key_id", name=op.f("uq_signing_keys_namespace_key_id")),
    )
    op.create_table(
        "signatures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key_id", KEY_ID, nullable=False),
        sa.Column("signature", sa.String(length=96), nullable=False),
        sa.Column("actor", ACTOR, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_signatures_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signatures")),
        # Also the index for "the signatures of a version" (version_id is its first column).
        sa.UniqueConstraint("version_id", "key_id", name=op.f("uq_signatures_version_id_key_id")),
    )


def downgrade() -> None:
    op.drop_table("signatures")
    op.drop_table("signing_keys")
