"""Jobs record how their cluster head starts (the estimator's ``init``); older jobs: auto.

Revision ID: 0004_job_init
Revises: 0003_curation
Create Date: 2025-02-15 (written as 0003 on the house2 branch; renumbered after
0003_curation when the branches were merged: main had shipped 0003_curation)
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_init"
down_revision = "0003_curation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("init", sa.String(20), nullable=False, server_default="auto"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("init")
