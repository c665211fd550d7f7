"""Datasets remember when a job last used them (retention: SP2OT_DATASET_TTL_DAYS).

Revision ID: 0002_dataset_last_used
Revises: 0001_initial
Create Date: 2025-02-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_dataset_last_used"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    # An existing dataset was last used by its newest job, or when it was uploaded.
    op.execute(
        "UPDATE datasets SET last_used_at = COALESCE("
        "(SELECT max(jobs.created_at) FROM jobs WHERE jobs.dataset_id = datasets.id), created_at)"
    )
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("last_used_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index("ix_datasets_last_used", "datasets", ["last_used_at"])


def downgrade() -> None:
    op.drop_index("ix_datasets_last_used", table_name="datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("last_used_at")
