"""Request and response bodies (pydantic v2). The engine's choices (backbones, modes,
formulations, inits) and the job statuses are enums, so OpenAPI lists their values; the
progress fields are :data:`sp2ot_engine.options.PROGRESS_FIELDS`."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer, model_validator

from app.models import JobStatus
from sp2ot_engine.options import PROGRESS_TYPES, Backbone, Formulation, Init, Mode


#: Schema bounds of the integer inputs (the settings may set lower limits: SP2OT_MAX_CLUSTERS,
#: SP2OT_MAX_EPOCHS); past them a request is a 422 rather than an overflow in the database.
MAX_CLUSTERS = 1_000_000
MAX_EPOCHS = 1_000_000
MAX_SEED = 2**31 - 1
MAX_OFFSET = 10**9
MAX_PAGE = 500
MAX_PAGE_NUMBER = 10**7  # of the web pages
MAX_INDEX = 2**31 - 1  # an image or cluster number (a 32-bit column)


class ErrorOut(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="What went wrong and how to fix it.")


class FieldError(BaseModel):
    loc: list[str] = Field(description="Where: the part of the request and the field.")
    msg: str
    type: str


class ValidationErrorOut(ErrorOut):
    """A request that does not match the schema (or breaks a server limit)."""

    errors: list[FieldError] | None = Field(None, description="One entry per invalid field, when the schema "
                                                              "rejected the request.")


class ServerErrorOut(ErrorOut):
    request_id: str = Field(description="Quote it when reporting the error: the server's log has the same id.")


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

    n_clusters: int | None = Field(None, ge=2, le=MAX_CLUSTERS, description=(
        "Number of clusters K (2 <= K <= number of images, and at most SP2OT_MAX_CLUSTERS); omit it to let the "
        "worker choose K in k_min..k_max."))
    k_min: int | None = Field(None, ge=2, le=MAX_CLUSTERS, description="Without n_clusters: the smallest K tried "
                                                                      "(default 2).")
    k_max: int | None = Field(None, ge=2, le=MAX_CLUSTERS, description=(
        "Without n_clusters: the largest K tried (default: number of images // 20, between 2 and 50; "
        "at most the number of images)."))
    backbone: Backbone | None = Field(None, description="Feature extractor (default efficientnet_lite0).")
    mode: Mode | None = Field(None, description="Training schedule (default fast).")
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="Training epochs (default: the mode's; "
                                                                       "at most SP2OT_MAX_EPOCHS).")
    formulation: Formulation | None = Field(None, description="OT formulation (default p2ot, or SP2OT_DEFAULT_FORMULATION).")
    init: Init | None = Field(None, description="How the cluster head starts (default auto).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed (the estimator's random_state).")
    callback_url: str | None = Field(None, max_length=2048, description=(
        "Where to POST the job's JSON once it succeeded, failed or was cancelled, signed with "
        "`X-SP2OT-Signature: sha256=<HMAC-SHA256 of the body>` (key: GET /callback-secret). Its host must be "
        "in SP2OT_CALLBACK_ALLOWED_HOSTS."))

    @model_validator(mode="after")
    def _k_or_range(self) -> "JobParams":
        if self.n_clusters is not None and (self.k_min is not None or self.k_max is not None):
            raise ValueError("give either n_clusters or k_min/k_max (to let the worker choose K), not both")
        if self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"k_min={self.k_min} is larger than k_max={self.k_max}: give k_min <= k_max")
        return self


class JobFromDataset(JobParams):
    """JSON body of ``POST /jobs`` to cluster a dataset uploaded with ``POST /datasets``."""

    dataset_id: str = Field(min_length=1, max_length=64)


class JobLinks(BaseModel):
    self: str
    labels: str
    metrics: str
    cancel: str


# One optional field per progress field of the engine (stage: the engine's stages, or the
# job's state when it is queued, failed or cancelled).
JobProgress = create_model("JobProgress", **{name: (Optional[kind], None) for name, kind in PROGRESS_TYPES.items()})


class SkippedFile(BaseModel):
    name: str
    reason: str


class KChoice(BaseModel):
    """How the worker chose K when the job did not give it."""

    chosen: int
    criterion: str = Field(description="What was maximised (sp2ot_engine.auto_k; modularity: Newman's modularity "
                                       "of the spectral partition of the kNN graph into K).")
    k_min: int
    k_max: int
    curve: list[list[float]] = Field(description="[K, criterion] for every K tried.")


class JobSummary(BaseModel):
    n_images: int
    n_clusters: int = Field(description="The K used: asked, or chosen (see k_choice).")
    k_choice: KChoice | None = Field(None, description="Set when the worker chose K.")
    n_outliers: int | None = Field(None, description="Images flagged as outliers (far from every cluster).")
    n_duplicates: int | None = Field(None, description="Images flagged as a (near-)duplicate of an earlier one.")
    cluster_sizes: list[int]
    n_skipped: int
    skipped: list[SkippedFile] = Field(description="Files not clustered and why (first 1000).")
    start: str | None = Field(None, description="Where the cluster head started (the init that was used: "
                                                "density, spectral, kmeans or random).")
    start_scores: dict[str, float] = Field(default_factory=dict, description=(
        "With init=auto: the mean cosine silhouette of each trained start's clusters; the higher one is kept."))
    start_notes: list[str] = Field(default_factory=list, description=(
        "Why a start was not used and what was used instead (for example too few density modes in a small set)."))


class JobOptions(BaseModel):
    n_clusters: int | None = Field(description="K as asked, or as chosen once the job succeeded; None while the "
                                               "worker has yet to choose it.")
    k_min: int | None = Field(None, description="Set when the worker chooses K: the range it chooses in.")
    k_max: int | None = None
    backbone: Backbone
    mode: Mode
    epochs: int | None
    formulation: Formulation
    init: Init
    seed: int


class CallbackOut(BaseModel):
    url: str
    status: Literal["pending", "sent", "failed"] = Field(
        description="pending until the job is final and the receiver answered 2xx (sent), or every attempt "
                    "failed (failed).")
    attempts: int
    error: str | None = Field(None, description="Why the last attempt failed.")


class JobOut(_Out):
    id: str
    status: JobStatus
    dataset_id: str | None
    input_name: str = Field(description="Name of the uploaded archive or dataset.")
    n_images: int = Field(description="Images found in the upload by their headers (the worker skips those whose "
                          "pixel data turns out damaged: see the summary).")
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
    callback: CallbackOut | None = Field(None, description="The completion callback, when the job has one.")


def job_links(root_path: str, job_id: str) -> dict[str, str]:
    base = f"{root_path}/jobs/{job_id}"
    return {"self": base, "labels": f"{base}/labels.csv", "metrics": f"{base}/metrics", "cancel": f"{base}/cancel"}


def job_out(job: Any, root_path: str = "") -> JobOut:
    """The JSON of a job row (``app.jobs.repository.JobRecord``): the API's answer and the body
    of its completion callback; links start with ``root_path``."""
    return JobOut.model_validate({
        "id": job.id, "status": job.status, "dataset_id": job.dataset_id, "input_name": job.input_name,
        "n_images": job.n_images,
        "options": {"n_clusters": job.n_clusters, "k_min": job.k_min, "k_max": job.k_max, "backbone": job.backbone, "mode": job.mode, "epochs": job.epochs,
                    "formulation": job.formulation, "init": job.init, "seed": job.seed},
        "has_truth": job.has_truth, "progress": job.progress or {}, "cancel_requested": job.cancel_requested,
        "attempts": job.attempts, "error": job.error, "summary": job.summary,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "links": job_links(root_path, job.id),
        "callback": None if not job.callback_url else {
            "url": job.callback_url, "status": job.callback_status or "pending",
            "attempts": job.callback_attempts or 0, "error": job.callback_error},
    })


class AssignLinks(BaseModel):
    self: str
    labels: str = Field(description="The CSV filename,cluster,confidence,outlier_score,outlier, once succeeded.")
    job: str


class AssignSummary(BaseModel):
    n_assigned: int
    cluster_counts: list[int] = Field(description="New images per cluster of the job.")
    n_skipped: int
    skipped: list[SkippedFile] = Field(description="Files not assigned and why (first 1000).")
    seconds: float


class AssignOut(_Out):
    """New images put into a succeeded job's clusters by its saved model (no training)."""

    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    input_name: str
    n_images: int
    error: str | None = None
    summary: AssignSummary | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: AssignLinks


def assign_out(req: Any, root_path: str = "") -> AssignOut:
    base = f"{root_path}/jobs/{req.job_id}"
    return AssignOut.model_validate({
        "id": req.id, "job_id": req.job_id, "status": req.status, "input_name": req.input_name,
        "n_images": req.n_images, "error": req.error, "summary": req.summary, "created_at": req.created_at,
        "started_at": req.started_at, "finished_at": req.finished_at,
        "links": {"self": f"{base}/assignments/{req.id}", "labels": f"{base}/assignments/{req.id}/labels.csv",
                  "job": base},
    })


class CallbackSecretOut(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of the X-SP2OT-Signature of your jobs' callbacks.")
    header: str = "X-SP2OT-Signature"


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
    k_choice: KChoice | None = Field(None, description="Set when the worker chose K: the criterion per K tried.")


# -------------------------------------------------------------------------------- datasets
class DatasetLinks(BaseModel):
    self: str
    jobs: str


class DatasetOut(_Out):
    id: str
    name: str
    n_images: int = Field(description="Images found in the archive by their headers.")
    n_skipped: int
    skipped: list[SkippedFile] = Field(description="Files not used and why (first 1000).")
    archive_bytes: int = Field(description="Size of the archive as uploaded.")
    uncompressed_bytes: int = Field(description="Total size of its images, uncompressed.")
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
