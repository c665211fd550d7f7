"""Upload bytes per key and request (the per-key hourly upload budget).

Revision ID: 0005_upload_usage
Revises: 0004_job_init
Create Date: 2025-03-20
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_upload_usage"
down_revision = "0004_job_init"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upload_usage",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_upload_usage_owner_at", "upload_usage", ["owner_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_upload_usage_owner_at", table_name="upload_usage")
    op.drop_table("upload_usage")
