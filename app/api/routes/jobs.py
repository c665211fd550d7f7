"""/jobs: create (archive upload or dataset), follow, download results, cancel, delete."""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app import crud, exports, results, schemas
from app.api import fairness
from app.api.deps import (
    DatabaseDep,
    OwnerDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    UploadDirDep,
)
from app.core.config import Settings
from app.core.db import Database
from app.core.security import Owner
from app.errors import ApiError, Conflict, NotFound, UploadRejected
from app.jobs import repository
from app.jobs.callbacks import check_callback_url
from app.jobs.repository import JobRecord
from app.models import Dataset, JobStatus, new_id
from app.schemas import (
    MAX_CLUSTERS,
    MAX_EPOCHS,
    MAX_OFFSET,
    MAX_PAGE,
    MAX_SEED,
    ErrorOut,
    JobFromDataset,
    JobList,
    JobOut,
    JobParams,
    MetricsOut,
)
from app.storage import Storage
from app.uploads.form import ReceivedForm, receive_multipart
from app.uploads.ingest import check_upload, image_names, read_upload_truth, store_upload
from sp2ot_engine.auto_k import k_range
from sp2ot_engine.io.labels_csv import write_truth
from sp2ot_engine.options import BACKBONES, FORMULATIONS, INITS, MODES

log = logging.getLogger("sp2ot.api")
router = APIRouter(prefix="/jobs", tags=["jobs"])

ERRORS = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    404: {"model": ErrorOut, "description": "No such job for this API key"},
}
SPREADSHEET_SAFE = ("true: a file or cluster name starting with = + - @, a tab or a carriage return gets a ' in "
                    "front, so a spreadsheet opening the file runs no formula (the names then differ from the "
                    "archive's; keep false to join on file names)")
TEXT_FIELDS = {"n_clusters", "k_min", "k_max", "backbone", "mode", "epochs", "formulation", "init", "seed",
               "dataset_id", "callback_url"}


def job_links(request: Request, job_id: str) -> dict[str, str]:
    return schemas.job_links(request.scope.get("root_path", ""), job_id)


def job_out(request: Request, job: JobRecord) -> JobOut:
    return schemas.job_out(job, request.scope.get("root_path", ""))


def _get_job_or_404(session, owner: Owner, job_id: str) -> JobRecord:
    job = repository.get_job(session, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key. List your jobs with GET /jobs.")
    return job


# --------------------------------------------------------------------------------- create
_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "archive": {"type": "string", "format": "binary",
                    "description": "zip, tar, tar.gz, tar.bz2 or tar.xz of the images (or give dataset_id)"},
        "dataset_id": {"type": "string", "minLength": 1, "maxLength": 64,
                       "description": "cluster a dataset uploaded with POST /datasets instead"},
        "truth": {"type": "string", "format": "binary",
                  "description": "optional CSV `filename,label` (ground truth, for GET /jobs/{id}/metrics; "
                                 "header optional, comma, semicolon or tab)"},
        "n_clusters": {"type": "integer", "minimum": 2, "maximum": MAX_CLUSTERS,
                       "description": "number of clusters; omit it to let the worker choose K in k_min..k_max"},
        "k_min": {"type": "integer", "minimum": 2, "maximum": MAX_CLUSTERS,
                  "description": "without n_clusters: smallest K tried (default 2)"},
        "k_max": {"type": "integer", "minimum": 2, "maximum": MAX_CLUSTERS,
                  "description": "without n_clusters: largest K tried (default images // 20, 2..50)"},
        "backbone": {"type": "string", "enum": list(BACKBONES)},
        "mode": {"type": "string", "enum": list(MODES)},
        "epochs": {"type": "integer", "minimum": 1, "maximum": MAX_EPOCHS},
        "formulation": {"type": "string", "enum": list(FORMULATIONS)},
        "init": {"type": "string", "enum": list(INITS)},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "callback_url": {"type": "string", "description": "POSTed the job's JSON (signed) once it is final; "
                                                          "its host must be in SP2OT_CALLBACK_ALLOWED_HOSTS"},
    },
}
# The enums it refers to are components of the document (the responses use them too).
_JSON_SCHEMA = {k: v for k, v in JobFromDataset.model_json_schema(ref_template="#/components/schemas/{model}").items()
                if k != "$defs"}
_CREATE_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": _JSON_SCHEMA},
        },
    }
}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "Invalid job options: " + "; ".join(parts) + "."


def _parse_params(fields: dict[str, Any], model=JobParams):
    data = {k: v for k, v in fields.items() if v not in (None, "")}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UploadRejected(_validation_message(e)) from None


def _job_options(params: JobParams, settings: Settings) -> dict[str, Any]:
    """The options stored on the job row (server defaults filled in), or a 422 naming the one
    over a server limit (the choices themselves are the schema's enums)."""
    for field in ("n_clusters", "k_min", "k_max"):
        value = getattr(params, field)
        if value is not None and value > settings.max_clusters:
            raise UploadRejected(f"{field}={value} is above the server limit of {settings.max_clusters} "
                                 "(SP2OT_MAX_CLUSTERS).")
    if params.epochs is not None and params.epochs > settings.max_epochs:
        raise UploadRejected(
            f"epochs={params.epochs} is above the server limit of {settings.max_epochs} (SP2OT_MAX_EPOCHS)."
        )
    return {
        "n_clusters": params.n_clusters,
        "backbone": params.backbone or settings.default_backbone,
        "mode": params.mode or settings.default_mode,
        "epochs": params.epochs,
        "formulation": params.formulation or settings.default_formulation,
        "init": params.init or settings.default_init,
        "seed": params.seed,
        **_callback_options(params, settings),
    }


def _callback_options(params: JobParams, settings: Settings) -> dict[str, Any]:
    """The job's completion callback (``app.jobs.callbacks``): none, or its URL checked against
    SP2OT_CALLBACK_ALLOWED_HOSTS (422) and pending."""
    if not params.callback_url:
        return {}
    return {"callback_url": check_callback_url(params.callback_url, settings),
            "callback_status": repository.CALLBACK_PENDING}


def _check_k(params: JobParams, n_images: int, opts: dict[str, Any]) -> None:
    """A 422 when K (or the range K is chosen in) does not fit ``n_images``; a range is stored
    resolved (the defaults of :func:`sp2ot_engine.auto_k.k_range` filled in)."""
    n_clusters = params.n_clusters
    if n_clusters is None:
        try:
            opts["k_min"], opts["k_max"] = k_range(n_images, params.k_min, params.k_max, samples="images")
        except ValueError as e:
            raise UploadRejected(f"{e}.") from None
        return
    if n_clusters > n_images:
        raise UploadRejected(
            f"n_clusters={n_clusters} is larger than the number of images ({n_images}). "
            f"Choose n_clusters between 2 and {n_images}, or upload more images."
        )


def _replay(request: Request, job: JobRecord) -> JSONResponse:
    return JSONResponse(job_out(request, job).model_dump(mode="json"), status_code=200,
                        headers={"Idempotent-Replayed": "true", "Location": job_links(request, job.id)["self"]})


def _find_idempotent(db: Database, owner: Owner, key: str) -> JobRecord | None:
    with db.session() as s:
        return repository.find_by_idempotency_key(s, owner, key)


def _create_from_upload(
    db: Database, settings: Settings, storage: Storage, owner: Owner, form: ReceivedForm, idem_key: str | None
) -> tuple[JobRecord, bool]:
    """Runs in a worker thread: check and store the archive (or find the dataset), the truth
    CSV, then the job row. Cleans up on error."""
    params = _parse_params({k: v for k, v in form.fields.items() if k != "dataset_id"})
    opts = _job_options(params, settings)
    archive = form.files.get("archive")
    dataset_id = form.fields.get("dataset_id") or None
    if archive is not None and dataset_id:
        raise UploadRejected("Send either an archive (field 'archive') or a dataset_id, not both.")
    if archive is None and not dataset_id:
        raise UploadRejected(
            "No images: send the images as a zip/tar archive in the form field 'archive', "
            "or the id of an uploaded dataset in 'dataset_id'."
        )
    truth = form.files.get("truth")
    job_id = new_id()
    job_dir = storage.job_dir(job_id)
    try:
        if archive is not None:
            checked = check_upload(archive.path, settings)
            _check_k(params, checked.n_images, opts)
            truth_rows = read_upload_truth(truth.path, truth.filename, checked.names) if truth is not None else None
            stored = store_upload(checked, job_dir)
            if truth_rows is not None:
                write_truth(storage.truth_path(job_id), truth_rows)
            with db.session() as s:
                job, created = repository.create_job(
                    s, owner, id=job_id, idempotency_key=idem_key, input_path=storage.rel(stored),
                    owns_input=True, input_name=(archive.filename or "upload")[:512], n_images=checked.n_images,
                    input_skipped=[list(x) for x in checked.skipped], has_truth=truth_rows is not None, **opts,
                )
        else:
            with db.session() as s:
                # The dataset row stays locked until the job is committed: it cannot be deleted meanwhile.
                ds = crud.get_dataset(s, owner, dataset_id, for_update=True)
                if ds is None:
                    raise NotFound(f"No dataset {dataset_id!r} for this API key. List them with GET /datasets.")
                _check_k(params, ds.n_images, opts)
                truth_rows = None
                if truth is not None:
                    names = image_names(storage.abs(ds.files_path))
                    truth_rows = read_upload_truth(truth.path, truth.filename, names)
                    job_dir.mkdir(parents=True)
                    write_truth(storage.truth_path(job_id), truth_rows)
                job, created = _create_dataset_job(s, job_id, owner, ds, idem_key, opts, truth_rows is not None)
        if not created:
            storage.remove_job_files(job_id)
        return job, created
    except BaseException:
        storage.remove_job_files(job_id)
        raise


def _create_dataset_job(s, job_id: str, owner: Owner, ds: Dataset, idem_key: str | None, opts: dict,
                        has_truth: bool) -> tuple[JobRecord, bool]:
    """A job on the locked dataset ``ds``; commits (which releases the lock)."""
    crud.mark_dataset_used(ds)
    return repository.create_job(
        s, owner, id=job_id, dataset_id=ds.id, idempotency_key=idem_key, input_path=ds.files_path,
        owns_input=False, input_name=ds.name, n_images=ds.n_images, input_skipped=list(ds.skipped or []),
        has_truth=has_truth, **opts,
    )


def _create_from_dataset(db: Database, settings: Settings, storage: Storage, owner: Owner,
                         body: JobFromDataset, idem_key: str | None) -> tuple[JobRecord, bool]:
    opts = _job_options(body, settings)
    with db.session() as s:
        # Locks the dataset row so that it cannot be deleted while the job is being created.
        ds = crud.get_dataset(s, owner, body.dataset_id, for_update=True)
        if ds is None:
            raise NotFound(f"No dataset {body.dataset_id!r} for this API key. List them with GET /datasets.")
        _check_k(body, ds.n_images, opts)
        return _create_dataset_job(s, new_id(), owner, ds, idem_key, opts, False)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Create a clustering job",
    openapi_extra=_CREATE_OPENAPI,
    responses={
        200: {"model": JobOut, "description": "Replay of an earlier request with the same Idempotency-Key"},
        401: ERRORS[401], 404: {"model": ErrorOut, "description": "Unknown dataset_id"},
        413: {"model": ErrorOut, "description": "Upload over SP2OT_MAX_UPLOAD_BYTES"},
        429: {"model": ErrorOut, "description": "Too many active jobs or upload bytes this hour for this key"},
        415: {"model": ErrorOut}, 422: {"model": ErrorOut, "description": "Invalid archive or options"},
        503: {"model": ErrorOut, "description": "Job queue unreachable"},
    },
)
async def create_job(
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    db: DatabaseDep,
    storage: StorageDep,
    upload_dir: UploadDirDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
):
    """Upload images and start clustering them.

    * `multipart/form-data`: the images as an archive in field **archive** (zip, tar,
      tar.gz, tar.bz2, tar.xz) or a **dataset_id**, plus **n_clusters** (or, to let the worker
      choose K, nothing or **k_min**/**k_max**) and the optional fields backbone, mode, epochs,
      formulation, init, seed, and an optional ground-truth CSV `filename,label` in field **truth**.
    * `application/json`: `{"dataset_id": "...", "n_clusters": 10, ...}`.

    Answers **202** with the job and its links; poll `GET /jobs/{id}`. With an
    **Idempotency-Key** header, a retry with the same key returns the first job (200) without
    uploading or creating anything.
    """
    if idempotency_key:
        existing = await run_in_threadpool(_find_idempotent, db, owner, idempotency_key)
        if existing is not None:
            return _replay(request, existing)
    await run_in_threadpool(fairness.check_active_jobs, db, settings, owner)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await _read_small_body(request, 1 << 20)
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            raise UploadRejected("The body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise UploadRejected('The JSON body must be an object like {"dataset_id": "...", "n_clusters": 10}.')
        body = _parse_params(payload, JobFromDataset)
        job, created = await run_in_threadpool(_create_from_dataset, db, settings, storage, owner, body, idempotency_key)
    elif ctype == "multipart/form-data":
        await run_in_threadpool(fairness.check_upload_budget, db, settings, owner, fairness.incoming_bytes(request))
        form = await receive_multipart(
            request, upload_dir, max_bytes=settings.max_upload_bytes,
            file_fields={"archive": settings.max_upload_bytes, "truth": settings.max_truth_bytes},
            text_fields=TEXT_FIELDS, chunk_bytes=settings.upload_chunk_bytes,
        )
        try:
            await run_in_threadpool(fairness.record_upload, db, settings, owner, form.received_bytes)
            job, created = await run_in_threadpool(
                _create_from_upload, db, settings, storage, owner, form, idempotency_key
            )
        finally:
            await run_in_threadpool(form.cleanup)
    else:
        raise ApiError(
            "Unsupported Content-Type: send multipart/form-data (an archive in field 'archive') "
            "or application/json ({\"dataset_id\": ..., \"n_clusters\": ...}).", 415,
        )
    if not created:
        return _replay(request, job)
    try:
        await run_in_threadpool(request.app.state.job_queue.submit, job.id)
    except Exception:
        await run_in_threadpool(_delete_job_everything, db, storage, job.id)
        raise
    log.info("job %s created by %s (%d images, K=%d)", job.id, owner.name, job.n_images, job.n_clusters)
    return JSONResponse(job_out(request, job).model_dump(mode="json"), status_code=202,
                        headers={"Location": job_links(request, job.id)["self"]})


async def _read_small_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything larger than ``limit`` without reading it all."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(f"The JSON body is larger than {limit} bytes.", 413)
    buf = bytearray()
    async for chunk in request.stream():
        buf.extend(chunk)
        if len(buf) > limit:
            raise ApiError(f"The JSON body is larger than {limit} bytes.", 413)
    return bytes(buf)


def _delete_job_everything(db: Database, storage: Storage, job_id: str) -> None:
    with db.begin() as s:
        repository.delete_job(s, job_id)
    storage.remove_job_files(job_id)


# ----------------------------------------------------------------------------------- read
@router.get("", response_model=JobList, responses={401: ERRORS[401], 422: {"model": ErrorOut}})
def list_jobs(
    request: Request,
    owner: OwnerDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status: Annotated[list[JobStatus] | None, Query(description="Filter: one or more statuses (repeat the "
                                                                "parameter: ?status=queued&status=running)")] = None,
    dataset_id: Annotated[str | None, Query(max_length=64)] = None,
):
    """Your jobs, newest first."""
    statuses = set(status) if status else None
    rows, total = repository.list_jobs(session, owner, limit, offset, statuses, dataset_id)
    return JobList(items=[job_out(request, j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, request: Request, owner: OwnerDep, db: DatabaseDep):
    """Status, progress (stage, percent, epoch, rho), timestamps, error or result summary."""

    # The polled endpoint: one autocommit query, on the event loop with PostgreSQL
    # (app.core.fastread), else in one thread-pool hop.
    pool = request.app.state.read_pool
    if pool is not None:
        job = await repository.get_job_async(pool, owner, job_id)
    else:
        job = await run_in_threadpool(_read_job, db, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key. List your jobs with GET /jobs.")
    return JSONResponse(job_out(request, job).model_dump(mode="json"))


def _read_job(db: Database, owner: Owner, job_id: str) -> JobRecord | None:
    with db.read_engine.connect() as conn:
        return repository.get_job(conn, owner, job_id)


def _require_success(job: JobRecord, what: str) -> None:
    if job.status == JobStatus.SUCCEEDED:
        return
    if job.status in JobStatus.ACTIVE:
        msg = (f"Job {job.id} is {job.status}: its {what} are available once it has succeeded. "
               f"Poll GET /jobs/{job.id} until status is 'succeeded'.")
    elif job.status == JobStatus.FAILED:
        msg = f"Job {job.id} failed, so it has no {what}: {job.error or 'unknown error'}"
    else:
        msg = f"Job {job.id} was cancelled, so it has no {what}. Create a new job."
    raise Conflict(msg)


@router.get(
    "/{job_id}/labels.csv",
    response_class=StreamingResponse,
    responses={**ERRORS, 409: {"model": ErrorOut, "description": "The job has not succeeded"},
               200: {"content": {"text/csv": {}}, "description": "filename,cluster,confidence"}},
)
async def get_labels(job_id: str, owner: OwnerDep, db: DatabaseDep,
                     spreadsheet_safe: Annotated[bool, Query(description=SPREADSHEET_SAFE)] = False):
    """The cluster of every image: CSV `filename,cluster,confidence` (confidence with 4
    decimals, as the CLI writes it), one row per image, in the order of the image names,
    streamed from the database. After a curation the clusters are the curated ones and a
    fourth column `cluster_name` gives their names. Names are exact (for joins by file name)
    unless `spreadsheet_safe=true`."""

    def check() -> tuple[JobRecord, bool]:
        with db.session() as s:
            job = _get_job_or_404(s, owner, job_id)
            _require_success(job, "labels")
            return job, results.curation_info(s, job_id).curated

    job, curated = await run_in_threadpool(check)
    # A curated result says so: its file name, a header, and a cluster_name column.
    name = f"sp2ot-{job_id}-{'curated-' if curated else ''}labels.csv"
    return StreamingResponse(
        exports.csv_stream(db, job, curated, spreadsheet_safe),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"',
                 "X-SP2OT-Curated": "true" if curated else "false"},
    )


@router.get("/{job_id}/metrics", response_model=MetricsOut,
            responses={**ERRORS, 409: {"model": ErrorOut, "description": "The job has not succeeded"}})
def get_metrics(job_id: str, owner: OwnerDep, session: ReadSessionDep, storage: StorageDep):
    """Cluster-size distribution, loss and rho curves; with a truth CSV, the paper's
    metrics (acc, nmi, f1, ari, head/medium/tail acc). After a curation, sizes and metrics
    are those of the curated clusters (`curated` says so)."""
    job = _get_job_or_404(session, owner, job_id)
    _require_success(job, "metrics")
    summary = job.summary or {}
    sizes = [int(x) for x in summary.get("cluster_sizes", [])]
    extra = job.metrics or {}
    curation = results.curation_info(session, job.id)
    if curation.curated:
        current = results.cluster_sizes(session, job.id)
        sizes = [current.get(c, 0) for c in range(results.cluster_count(job.n_clusters, current))]
        if job.has_truth:
            ev = results.evaluation(session, job.id, storage.truth_path(job.id), curation.version)
            extra = {**extra, "evaluation": ev["evaluation"]}
    nonempty = [x for x in sizes if x > 0]
    n = len(sizes) or 1
    mean = sum(sizes) / n
    std = (sum((x - mean) ** 2 for x in sizes) / n) ** 0.5
    history = job.history or []
    return MetricsOut(
        job_id=job.id, n_images=int(summary.get("n_images", 0)), n_clusters=job.n_clusters, cluster_sizes=sizes,
        cluster_size_distribution={
            "min": min(sizes, default=0), "max": max(sizes, default=0), "mean": mean, "std": std,
            "imbalance_ratio": (max(nonempty) / min(nonempty)) if nonempty else None,
            "empty_clusters": len(sizes) - len(nonempty),
        },
        history=history,
        curves={"epoch": [h.get("epoch") for h in history], "loss": [h.get("loss") for h in history],
                "rho": [h.get("rho") for h in history]},
        evaluation=extra.get("evaluation"),
        truth=extra.get("truth"),
        curated=curation.curated,
        curation_edits=curation.edits,
        k_choice=summary.get("k_choice"),
    )


# ------------------------------------------------------------------------- cancel/delete
@router.post("/{job_id}/cancel", response_model=JobOut,
             responses={**ERRORS, 409: {"model": ErrorOut, "description": "The job already finished"}})
def cancel_job(job_id: str, request: Request, owner: OwnerDep, session: SessionDep):
    """Cancel a queued job at once, or ask a running one to stop after its current training
    step (status becomes `cancelled` within about a second). Cancelling a cancelled job is a
    no-op; a succeeded or failed job cannot be cancelled (409)."""
    job = _get_job_or_404(session, owner, job_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Conflict(f"Job {job.id} already {job.status}; there is nothing to cancel. Delete it with DELETE /jobs/{job.id}.")
    if job.status in JobStatus.ACTIVE:
        job = repository.request_cancel(session, job.id) or job
        if job.status == JobStatus.CANCELLED:  # a queued job ends here, not in a worker
            request.app.state.job_queue.notify(job.id)
    return job_out(request, job)


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
def delete_job(job_id: str, owner: OwnerDep, session: SessionDep, storage: StorageDep):
    """Delete a job, its results and its uploaded files. A running job is stopped first (its
    worker notices the job is gone within about a second). A dataset used by the job is kept."""
    job = _get_job_or_404(session, owner, job_id)
    repository.delete_job(session, job.id)
    session.commit()
    # The job folder holds its own images (archive upload) and truth CSV; a dataset's images
    # live in the dataset's folder and are kept.
    storage.remove_job_files(job.id)
    return Response(status_code=204)
