"""Jobs record how their cluster head starts (the estimator's ``init``); older jobs: auto.

Revision ID: 0003_job_init
Revises: 0002_dataset_last_used
Create Date: 2025-02-15
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_init"
down_revision = "0002_dataset_last_used"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("init", sa.String(20), nullable=False, server_default="auto"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("init")
