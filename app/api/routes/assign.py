"""/jobs/{id}/assign: put new images into the clusters of a succeeded job, with the job's saved
model and without training; and ``/callback-secret``, the key of a caller's job callbacks.

Assigning extracts the new images' features with the job's backbone, which takes torch (never
imported by the API) and tens of seconds for a thousand images on a CPU, so it is a small task
run by a worker: ``POST`` answers **202** with an assign request, polled at
``GET /jobs/{id}/assignments/{aid}`` until it has succeeded, then its CSV is at
``.../labels.csv``. The upload is checked by the same rules as ``POST /jobs`` (``app.uploads``).
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from app import crud
from app.api import fairness
from app.api.deps import DatabaseDep, OwnerDep, ReadSessionDep, SettingsDep, StorageDep, UploadDirDep, server_secret
from app.api.routes.jobs import ERRORS, _get_job_or_404, _require_success
from app.core.config import Settings
from app.core.db import Database
from app.core.security import Owner, callback_secret
from app.errors import Conflict, NotFound, UploadRejected
from app.jobs import artifacts, repository
from app.jobs.assigning import ASSIGNMENTS_CSV, assign_dir
from app.models import JobStatus, new_id
from app.schemas import AssignOut, CallbackSecretOut, ErrorOut, assign_out
from app.storage import Storage
from app.uploads.form import ReceivedForm, receive_multipart
from app.uploads.ingest import check_upload, store_upload

log = logging.getLogger("sp2ot.api")
router = APIRouter(tags=["assign"])
NOT_SUCCEEDED = {"model": ErrorOut, "description": "The job has not succeeded (or has no saved model)"}


def _job_with_model(db: Database, storage: Storage, owner: Owner, job_id: str):
    with db.session() as s:
        job = _get_job_or_404(s, owner, job_id)
    _require_success(job, "model for assigning new images")
    if not (storage.job_dir(job.id) / artifacts.MODEL_FILE).is_file():
        raise Conflict(f"Job {job.id} has no saved model (it finished before models were kept). Cluster the "
                       "images again to assign new ones.")
    return job


def _create(db: Database, settings: Settings, storage: Storage, owner: Owner, job_id: str,
            form: ReceivedForm) -> repository.AssignRecord:
    """Runs in a worker thread: check and store the archive, then the request row; cleans up on error."""
    archive = form.files.get("archive")
    if archive is None:
        raise UploadRejected("No images: send the new images as a zip/tar archive in the form field 'archive'.")
    job = _job_with_model(db, storage, owner, job_id)  # again: it may have been deleted meanwhile
    request_id = new_id()
    folder = assign_dir(storage, job.id, request_id)
    try:
        checked = check_upload(archive.path, settings)
        stored = store_upload(checked, folder)
        with db.session() as s:
            return repository.create_assign_request(
                s, id=request_id, job_id=job.id, input_path=storage.rel(stored),
                input_name=(archive.filename or "upload")[:512], n_images=checked.n_images,
                input_skipped=[list(x) for x in checked.skipped])
    except BaseException:
        storage.remove(folder)
        raise


def _delete(db: Database, storage: Storage, req: repository.AssignRecord) -> None:
    with db.begin() as s:
        repository.delete_assign_request(s, req.id)
    storage.remove(assign_dir(storage, req.job_id, req.id))


@router.post(
    "/jobs/{job_id}/assign", status_code=202, response_model=AssignOut,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["archive"],
        "properties": {"archive": {"type": "string", "format": "binary",
                                   "description": "zip, tar, tar.gz, tar.bz2 or tar.xz of the new images"}},
    }}}}},
    responses={**ERRORS, 409: NOT_SUCCEEDED, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
               429: {"model": ErrorOut, "description": "Upload bytes this hour for this key used up"},
               503: {"model": ErrorOut, "description": "Job queue unreachable"}},
)
async def assign_images(job_id: str, request: Request, owner: OwnerDep, settings: SettingsDep, db: DatabaseDep,
                        storage: StorageDep, upload_dir: UploadDirDep):
    """Assign new images to the clusters of a succeeded job with its model, without training.
    Answers **202** with the request; poll its `links.self` until `status` is `succeeded`,
    then download `links.labels` (CSV `filename,cluster,confidence,outlier_score,outlier`).
    409 when the job has not succeeded."""
    await run_in_threadpool(fairness.check_upload_budget, db, settings, owner, fairness.incoming_bytes(request))
    await run_in_threadpool(_job_with_model, db, storage, owner, job_id)  # 404/409 before the upload is read
    form = await receive_multipart(
        request, upload_dir, max_bytes=settings.max_upload_bytes,
        file_fields={"archive": settings.max_upload_bytes}, text_fields=set(),
        chunk_bytes=settings.upload_chunk_bytes,
    )
    try:
        await run_in_threadpool(fairness.record_upload, db, settings, owner, form.received_bytes)
        req = await run_in_threadpool(_create, db, settings, storage, owner, job_id, form)
    finally:
        await run_in_threadpool(form.cleanup)
    try:
        await run_in_threadpool(request.app.state.job_queue.submit_assign, req.id)
    except Exception:
        await run_in_threadpool(_delete, db, storage, req)
        raise
    out = assign_out(req, request.scope.get("root_path", ""))
    log.info("assign request %s for job %s (%d images)", req.id, job_id, req.n_images)
    return JSONResponse(out.model_dump(mode="json"), status_code=202, headers={"Location": out.links.self})


def _get_request_or_404(session, owner: Owner, job_id: str, request_id: str) -> repository.AssignRecord:
    _get_job_or_404(session, owner, job_id)
    req = repository.get_assign_request(session, job_id, request_id)
    if req is None:
        raise NotFound(f"No assign request {request_id!r} for job {job_id}.")
    return req


@router.get("/jobs/{job_id}/assignments/{request_id}", response_model=AssignOut, responses=ERRORS)
def get_assign_request(job_id: str, request_id: str, request: Request, owner: OwnerDep, session: ReadSessionDep):
    """Status of an assign request: queued, running, succeeded (with a summary) or failed (with why)."""
    return assign_out(_get_request_or_404(session, owner, job_id, request_id), request.scope.get("root_path", ""))


@router.get("/jobs/{job_id}/assignments/{request_id}/labels.csv", response_class=FileResponse,
            responses={**ERRORS, 409: {"model": ErrorOut, "description": "The request has not succeeded"},
                       200: {"content": {"text/csv": {}},
                             "description": "filename,cluster,confidence,outlier_score,outlier"}})
def get_assign_labels(job_id: str, request_id: str, owner: OwnerDep, session: ReadSessionDep, storage: StorageDep):
    """The new images' clusters: CSV `filename,cluster,confidence,outlier_score,outlier`
    (confidence: the model's probability of the cluster; the outlier columns are empty when the
    model has no outlier rule)."""
    req = _get_request_or_404(session, owner, job_id, request_id)
    if req.status != JobStatus.SUCCEEDED:
        raise Conflict(f"Assign request {req.id} is {req.status}"
                       + (f": {req.error}" if req.error else f"; poll GET /jobs/{job_id}/assignments/{req.id}."))
    path = assign_dir(storage, job_id, req.id) / ASSIGNMENTS_CSV
    return FileResponse(path, media_type="text/csv; charset=utf-8",
                        filename=f"sp2ot-{job_id}-assigned-{req.id}.csv")


@router.get("/callback-secret", response_model=CallbackSecretOut, responses={401: ERRORS[401]}, tags=["jobs"])
def get_callback_secret(request: Request, owner: OwnerDep, session: ReadSessionDep):
    """The key your jobs' completion callbacks are signed with: a receiver checks that
    `X-SP2OT-Signature` equals `sha256=` + hex HMAC-SHA256(secret, raw body)."""
    return CallbackSecretOut(secret=callback_secret(server_secret(request.app), crud.key_hash_of(session, owner)))
