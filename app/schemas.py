"""Request and response bodies (pydantic v2)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong and how to fix it.")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("*", when_used="json")
    def _utc(self, v: Any) -> Any:
        # SQLite gives naive datetimes back: they are UTC.
        if isinstance(v, datetime) and v.tzinfo is None:
            return v.replace(tzinfo=timezone.utc)
        return v


# ------------------------------------------------------------------------------------ jobs
class JobParams(BaseModel):
    """Clustering options; omitted ones take the server defaults."""

    model_config = ConfigDict(extra="forbid")

    n_clusters: int = Field(ge=2, description="Number of clusters K (2 <= K <= number of images).")
    backbone: str | None = Field(None, max_length=100, description="Feature extractor (default efficientnet_lite0).")
    mode: str | None = Field(None, max_length=20, description="Training schedule (default fast).")
    epochs: int | None = Field(None, ge=1, description="Training epochs (default: the mode's).")
    formulation: str | None = Field(None, max_length=40, description="OT formulation (default sp2ot).")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class JobFromDataset(JobParams):
    """JSON body of ``POST /jobs`` to cluster a dataset uploaded with ``POST /datasets``."""

    dataset_id: str = Field(min_length=1, max_length=64)


class JobLinks(BaseModel):
    self: str
    labels: str
    metrics: str
    cancel: str


class JobProgress(BaseModel):
    stage: str | None = None
    percent: float | None = None
    epoch: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    rho: float | None = None


class SkippedFile(BaseModel):
    name: str
    reason: str


class JobSummary(BaseModel):
    n_images: int
    n_clusters: int
    cluster_sizes: list[int]
    n_skipped: int
    skipped: list[SkippedFile] = Field(description="Files not clustered and why (first 1000).")


class JobOptions(BaseModel):
    n_clusters: int
    backbone: str
    mode: str
    epochs: int | None
    formulation: str
    seed: int


class JobOut(_Out):
    id: str
    status: JobStatusName
    dataset_id: str | None
    input_name: str = Field(description="Name of the uploaded archive or dataset.")
    n_images: int = Field(description="Images found in the upload.")
    options: JobOptions
    has_truth: bool
    progress: JobProgress
    cancel_requested: bool
    attempts: int = Field(description="How many times a worker started the job (> 1 after a worker died).")
    error: str | None = Field(None, description="Why the job failed.")
    summary: JobSummary | None = Field(None, description="Set when the job succeeded.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: JobLinks


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ClusterSizeStats(BaseModel):
    min: int
    max: int
    mean: float
    std: float
    imbalance_ratio: float | None = Field(description="Largest / smallest non-empty cluster.")
    empty_clusters: int


class Curves(BaseModel):
    epoch: list[int | None]
    loss: list[float | None]
    rho: list[float | None]


class TruthInfo(BaseModel):
    n_labelled: int = Field(description="Clustered images that have a ground-truth label.")
    n_classes: int


class MetricsOut(BaseModel):
    job_id: str
    n_images: int
    n_clusters: int
    cluster_sizes: list[int]
    cluster_size_distribution: ClusterSizeStats
    history: list[dict[str, Any]]
    curves: Curves
    evaluation: dict[str, float | None] | None = Field(
        None, description="acc, nmi, f1, ari, head/medium/tail acc (needs a truth CSV)."
    )
    truth: TruthInfo | None = None
    curated: bool = Field(False, description="A person edited the clusters: sizes and metrics are the curated ones.")
    curation_edits: int = Field(0, description="How many curation edits are in force.")


# -------------------------------------------------------------------------------- datasets
class DatasetLinks(BaseModel):
    self: str
    jobs: str


class DatasetOut(_Out):
    id: str
    name: str
    n_images: int
    n_skipped: int
    skipped: list[SkippedFile]
    archive_bytes: int
    uncompressed_bytes: int
    created_at: datetime
    links: DatasetLinks


class DatasetList(BaseModel):
    items: list[DatasetOut]
    total: int
    limit: int
    offset: int


# ---------------------------------------------------------------------------------- health
class ComponentHealth(BaseModel):
    ok: bool
    detail: str | None = None
    latency_ms: float | None = None


class WorkersHealth(BaseModel):
    ok: bool
    mode: Literal["in-process", "celery"]
    count: int
    names: list[str] = []
    detail: str | None = None


class JobsHealth(BaseModel):
    ok: bool
    without_worker: int = Field(
        description="Running jobs whose worker stopped answering (heartbeat older than SP2OT_HEARTBEAT_TIMEOUT); "
        "the reaper re-queues or ends them within SP2OT_REAPER_INTERVAL."
    )
    without_worker_ids: list[str] = Field([], description="Their ids (the first 20).")
    detail: str | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "down"]
    version: str
    database: ComponentHealth
    broker: ComponentHealth
    workers: WorkersHealth
    jobs: JobsHealth
