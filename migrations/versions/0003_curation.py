"""Curation (cluster names, edits and the images they moved) and the indexes of the result pages.

Revision ID: 0003_curation
Revises: 0002_dataset_last_used
Create Date: 2025-03-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_curation"
down_revision = "0002_dataset_last_used"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_assignments_job_cluster_conf", "assignments", ["job_id", "cluster", "confidence"])
    op.create_index("ix_assignments_job_conf", "assignments", ["job_id", "confidence"])
    op.create_table(
        "cluster_names",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("cluster", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
    )
    op.create_table(
        "curation_edits",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_curation_edits_job", "curation_edits", ["job_id", "id"])
    op.create_table(
        "curation_moves",
        sa.Column("edit_id", sa.Integer(), sa.ForeignKey("curation_edits.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("from_cluster", sa.Integer(), nullable=False),
    )
    op.create_index("ix_curation_moves_job", "curation_moves", ["job_id", "idx"])


def downgrade() -> None:
    op.drop_index("ix_curation_moves_job", table_name="curation_moves")
    op.drop_table("curation_moves")
    op.drop_index("ix_curation_edits_job", table_name="curation_edits")
    op.drop_table("curation_edits")
    op.drop_table("cluster_names")
    op.drop_index("ix_assignments_job_conf", table_name="assignments")
    op.drop_index("ix_assignments_job_cluster_conf", table_name="assignments")
