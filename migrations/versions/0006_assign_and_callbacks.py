"""Completion callbacks of jobs (callback_url and its delivery state) and the requests that
assign new images to a succeeded job's clusters (assign_requests).

Revision ID: 0006_assign_and_callbacks
Revises: 0005_upload_usage
Create Date: 2025-03-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_assign_and_callbacks"
down_revision = "0005_upload_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("callback_url", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("callback_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("callback_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("callback_error", sa.Text(), nullable=True))
    op.create_table(
        "assign_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("input_path", sa.String(1024), nullable=False),
        sa.Column("input_name", sa.String(512), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("input_skipped", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_assign_requests_job", "assign_requests", ["job_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_assign_requests_job", table_name="assign_requests")
    op.drop_table("assign_requests")
    with op.batch_alter_table("jobs") as batch:
        for column in ("callback_error", "callback_attempts", "callback_status", "callback_url"):
            batch.drop_column(column)
