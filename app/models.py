"""Database tables (SQLAlchemy 2 typed declarative models).

The schema exists only through the Alembic migrations in ``migrations/``; a test checks
that the migrations and these models agree.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sp2ot_engine.options import Init, StrEnum


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class JobStatus(StrEnum):
    """The states of a job (``app.jobs.repository`` has the moves between them); members equal
    their strings, as stored in ``jobs.status``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Groups of states, set after the class: in its body they would become members.
JobStatus.ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)  # type: ignore[attr-defined]
JobStatus.TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)  # type: ignore[attr-defined]
JobStatus.ALL = tuple(JobStatus)  # type: ignore[attr-defined]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    # sha256 hex of the key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_owner_created", "owner_id", "created_at"),
        Index("ix_datasets_last_used", "last_used_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(512))
    # The stored upload (its manifest next to it), relative to the data dir; stored before
    # manifests existed: a folder of extracted images.
    files_path: Mapped[str] = mapped_column(String(1024))
    archive_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    uncompressed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When it was uploaded or a job was last created from it (retention: SP2OT_DATASET_TTL_DAYS).
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_dataset", "dataset_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The stored upload the job clusters (or a folder of images, see Dataset.files_path),
    # relative to the data dir; owned by the job (deleted with it) unless it is a dataset's.
    input_path: Mapped[str] = mapped_column(String(1024))
    owns_input: Mapped[bool] = mapped_column(Boolean, default=True)
    input_name: Mapped[str] = mapped_column(String(512), default="")

    # K as asked; when the user left it to the service (k_min/k_max set), None until the worker
    # records the K it chose with the results.
    n_clusters: Mapped[int | None] = mapped_column(Integer, nullable=True)
    k_min: Mapped[int | None] = mapped_column(Integer, nullable=True)
    k_max: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backbone: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(20))
    epochs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    formulation: Mapped[str] = mapped_column(String(40))
    init: Mapped[str] = mapped_column(String(20), default=Init.AUTO.value, server_default=Init.AUTO.value)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    has_truth: Mapped[bool] = mapped_column(Boolean, default=False)
    # Images found and files skipped when the upload was checked (before training).
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    input_skipped: Mapped[list[Any]] = mapped_column(default=list)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Incremented each time a worker (re)starts the job; a worker whose attempt is no
    # longer current has been superseded and must not write anything.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    history: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    # Completion callback (app.jobs.callbacks): where to POST the job once it is final, and how
    # the delivery went: pending (not yet delivered), sent or failed (attempts used up).
    callback_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    callback_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Assignment(Base):
    """One clustered image of a succeeded job. ``cluster`` is the current cluster: the engine's,
    or the curated one after a curation edit (``app.curation``)."""

    __tablename__ = "assignments"
    __table_args__ = (
        # Pages of a cluster by confidence, and the least confident images of a job (app.results).
        Index("ix_assignments_job_cluster_conf", "job_id", "cluster", "confidence"),
        Index("ix_assignments_job_conf", "job_id", "confidence"),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    filename: Mapped[str] = mapped_column(Text)
    cluster: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    # The engine's flags (sp2ot_engine.flags); None for jobs clustered before they existed.
    outlier_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    outlier: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    duplicate_of: Mapped[str | None] = mapped_column(Text, nullable=True)  # the earlier image's filename


class ClusterName(Base):
    """The name a person gave a cluster of a job (curation); unnamed clusters have no row."""

    __tablename__ = "cluster_names"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    cluster: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))


class CurationEdit(Base):
    """One curation edit of a job (rename, merge, move), in order; undo removes the last."""

    __tablename__ = "curation_edits"
    __table_args__ = (Index("ix_curation_edits_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    # What the edit did, enough to undo a rename: {"cluster", "name", "previous"}; for a merge
    # {"clusters", "into"}; for a move {"to", "count"}.
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CurationMove(Base):
    """An image an edit moved, and the cluster it came from (undo puts it back)."""

    __tablename__ = "curation_moves"
    __table_args__ = (Index("ix_curation_moves_job", "job_id", "idx"),)

    edit_id: Mapped[int] = mapped_column(ForeignKey("curation_edits.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    from_cluster: Mapped[int] = mapped_column(Integer)


class UploadUsage(Base):
    """Bytes one key sent in one upload request, accepted or not (the per-key hourly upload
    budget, ``SP2OT_MAX_UPLOAD_BYTES_PER_HOUR``); rows older than the window are pruned."""

    __tablename__ = "upload_usage"
    __table_args__ = (Index("ix_upload_usage_owner_at", "owner_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    bytes: Mapped[int] = mapped_column(BigInteger)


class AssignRequest(Base):
    """New images to put into the clusters of a succeeded job with its saved model, without
    training (``POST /jobs/{id}/assign``); run by a worker (``app.jobs.assigning``). States:
    queued -> running -> succeeded | failed. Its files (the upload, the CSV) are in the job's
    folder and go with the job."""

    __tablename__ = "assign_requests"
    __table_args__ = (Index("ix_assign_requests_job", "job_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # The stored upload of the new images (manifest next to it), relative to the data dir.
    input_path: Mapped[str] = mapped_column(String(1024))
    input_name: Mapped[str] = mapped_column(String(512), default="")
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    input_skipped: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set when it succeeded: n_assigned, cluster_counts, n_skipped, skipped (first 1000), seconds.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
