"""Expected results: the fingerprint of the merged model a version yields, per base dtype.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)  # UTC (models.UTCDateTime)
ACTOR = sa.String(length=256)


def upgrade() -> None:
    op.create_table(
        "expected_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("base_dtype", sa.String(length=8), nullable=False),
        sa.Column("fingerprint", sa.String(length=80), nullable=False),
        sa.Column("actor", ACTOR, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_expected_results_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expected_results")),
        # Also the index for "the results of a version" (version_id is its first column).
        sa.UniqueConstraint(
            "version_id", "base_dtype", name=op.f("uq_expected_results_version_id_base_dtype")
        ),
    )


def downgrade() -> None:
    op.drop_table("expected_results")
