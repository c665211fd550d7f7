"""Jobs may leave K to the worker (k_min/k_max, n_clusters null until it chose); assignments
carry the engine's per-image flags (outlier score and flag, duplicate_of), null for older jobs.

Revision ID: 0007_auto_k_flags
Revises: 0006_assign_and_callbacks
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_auto_k_flags"
down_revision = "0006_assign_and_callbacks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("n_clusters", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("k_min", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("k_max", sa.Integer(), nullable=True))
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("outlier_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("outlier", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("duplicate_of", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("duplicate_of")
        batch.drop_column("outlier")
        batch.drop_column("outlier_score")
    # a job still waiting to choose K gets its k_max: the old code needs a K
    op.execute("UPDATE jobs SET n_clusters = k_max WHERE n_clusters IS NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("k_max")
        batch.drop_column("k_min")
        batch.alter_column("n_clusters", existing_type=sa.Integer(), nullable=False)
