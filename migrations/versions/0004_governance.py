"""Governance: who pushed, yanks, richer evals, promotion policies, approvals, the chained audit log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)  # UTC (models.UTCDateTime)
ACTOR = sa.String(length=256)


def upgrade() -> None:
    # Nullable ADD COLUMNs only: no table copy on SQLite, no rewrite on PostgreSQL.
    op.add_column("versions", sa.Column("pushed_by", ACTOR, nullable=True))
    op.add_column("versions", sa.Column("yanked_at", TIMESTAMP, nullable=True))
    op.add_column("versions", sa.Column("yank_reason", sa.Text(), nullable=True))
    op.add_column("versions", sa.Column("yanked_by", ACTOR, nullable=True))
    op.create_index(op.f("ix_versions_parent_digest"), "versions", ["parent_digest"])
    op.add_column("evals", sa.Column("dataset_revision", sa.String(length=256), nullable=True))
    op.add_column("evals", sa.Column("suite_version", sa.String(length=128), nullable=True))
    op.add_column("evals", sa.Column("actor", ACTOR, nullable=True))
    op.create_index("ix_evals_name_value", "evals", ["name", "value"])
    op.create_index("ix_evals_version_id_name_id", "evals", ["version_id", "name", "id"])
    op.create_index("ix_evals_dataset", "evals", ["dataset"])
    op.create_table(
        "alias_policies",
        sa.Column("repo_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("updated_by", ACTOR, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["repo_id"], ["repos.id"], name=op.f("fk_alias_policies_repo_id_repos")),
        sa.PrimaryKeyConstraint("repo_id", "alias", name=op.f("pk_alias_policies")),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("actor", ACTOR, nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_approvals_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("version_id", "alias", "actor", name=op.f("uq_approvals_version_id_alias_actor")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("actor", ACTOR, nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("repo", sa.String(length=129), nullable=True),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=71), nullable=False),
        sa.Column("entry_hash", sa.String(length=71), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sa.UniqueConstraint("entry_hash", name=op.f("uq_audit_log_entry_hash")),
    )
    op.create_index(op.f("ix_audit_log_repo"), "audit_log", ["repo"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_repo"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("approvals")
    op.drop_table("alias_policies")
    op.drop_index("ix_evals_dataset", table_name="evals")
    op.drop_index("ix_evals_version_id_name_id", table_name="evals")
    op.drop_index("ix_evals_name_value", table_name="evals")
    for column in ("actor", "suite_version", "dataset_revision"):
        op.drop_column("evals", column)
    op.drop_index(op.f("ix_versions_parent_digest"), table_name="versions")
    for column in ("yanked_by", "yank_reason", "yanked_at", "pushed_by"):
        op.drop_column("versions", column)
