"""Aliases with their move history; blob last-use times for garbage collection.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)  # UTC (models.UTCDateTime)
EPOCH = "1970-01-01 00:00:00"


def upgrade() -> None:
    # A plain ADD COLUMN (no table copy: blobs is referenced by version_files, and SQLite cannot switch
    # foreign keys off inside the migration's transaction). SQLite's ADD COLUMN NOT NULL needs a
    # constant default; existing rows then take their creation time.
    op.add_column(
        "blobs", sa.Column("last_used_at", TIMESTAMP, server_default=sa.text(f"'{EPOCH}'"), nullable=False)
    )
    op.execute("UPDATE blobs SET last_used_at = created_at")
    op.create_index(op.f("ix_blobs_last_used_at"), "blobs", ["last_used_at"])
    op.create_index(op.f("ix_version_files_blob_digest"), "version_files", ["blob_digest"])
    op.create_table(
        "aliases",
        sa.Column("repo_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["repo_id"], ["repos.id"], name=op.f("fk_aliases_repo_id_repos")),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name=op.f("fk_aliases_version_id_versions")),
        sa.PrimaryKeyConstraint("repo_id", "name", name=op.f("pk_aliases")),
    )
    op.create_index(op.f("ix_aliases_version_id"), "aliases", ["version_id"])
    op.create_table(
        "alias_moves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repo_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("from_version_id", sa.Integer(), nullable=True),
        sa.Column("to_version_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=256), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["repo_id"], ["repos.id"], name=op.f("fk_alias_moves_repo_id_repos")),
        sa.ForeignKeyConstraint(
            ["from_version_id"], ["versions.id"], name=op.f("fk_alias_moves_from_version_id_versions")
        ),
        sa.ForeignKeyConstraint(
            ["to_version_id"], ["versions.id"], name=op.f("fk_alias_moves_to_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_moves")),
    )
    op.create_index(
        "ix_alias_moves_repo_id_alias_created_at", "alias_moves", ["repo_id", "alias", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_alias_moves_repo_id_alias_created_at", table_name="alias_moves")
    op.drop_table("alias_moves")
    op.drop_index(op.f("ix_aliases_version_id"), table_name="aliases")
    op.drop_table("aliases")
    op.drop_index(op.f("ix_version_files_blob_digest"), table_name="version_files")
    op.drop_index(op.f("ix_blobs_last_used_at"), table_name="blobs")
    op.drop_column("blobs", "last_used_at")  # native DROP COLUMN (SQLite >= 3.35): no table copy
