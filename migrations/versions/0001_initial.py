"""Initial schema: repos, blobs, versions and their files.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIGEST = sa.String(length=71)  # "sha256:" + 64 hex
TIMESTAMP = sa.DateTime(timezone=True)  # UTC (models.base.UTCDateTime)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", DIGEST, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_table(
        "repos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_repos")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_repos_namespace_name")),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repo_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("digest", DIGEST, nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("base_fingerprint", sa.String(length=69), nullable=False),
        sa.Column("parent_digest", DIGEST, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["repo_id"], ["repos.id"], name=op.f("fk_versions_repo_id_repos")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_versions")),
        sa.UniqueConstraint("repo_id", "digest", name=op.f("uq_versions_repo_id_digest")),
        sa.UniqueConstraint("repo_id", "number", name=op.f("uq_versions_repo_id_number")),
    )
    op.create_index(op.f("ix_versions_base_fingerprint"), "versions", ["base_fingerprint"])
    op.create_index(op.f("ix_versions_digest"), "versions", ["digest"])
    op.create_table(
        "version_files",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("blob_digest", DIGEST, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_digest"], ["blobs.digest"], name=op.f("fk_version_files_blob_digest_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_version_files_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("version_id", "path", name=op.f("pk_version_files")),
    )


def downgrade() -> None:
    op.drop_table("version_files")
    op.drop_index(op.f("ix_versions_digest"), table_name="versions")
    op.drop_index(op.f("ix_versions_base_fingerprint"), table_name="versions")
    op.drop_table("versions")
    op.drop_table("repos")
    op.drop_table("blobs")
