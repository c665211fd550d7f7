"""/datasets: upload an image archive once, cluster it several times.

Deleting a dataset that a queued or running job uses answers **409** (cancel those jobs or
wait for them first); finished jobs keep their results and simply lose the link
(``dataset_id`` becomes null).
"""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app import crud
from app.api import fairness
from app.api.deps import DatabaseDep, OwnerDep, ReadSessionDep, SessionDep, SettingsDep, StorageDep, UploadDirDep
from app.core.config import Settings
from app.core.db import Database
from app.core.security import Owner
from app.errors import Conflict, NotFound, UploadRejected
from app.jobs import repository
from app.models import Dataset, new_id
from app.schemas import MAX_OFFSET, MAX_PAGE, DatasetList, DatasetOut, ErrorOut
from app.storage import Storage
from app.uploads.form import ReceivedForm, receive_multipart
from app.uploads.ingest import check_upload, store_upload

log = logging.getLogger("sp2ot.api")
router = APIRouter(prefix="/datasets", tags=["datasets"])
ERRORS = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    404: {"model": ErrorOut, "description": "No such dataset for this API key"},
}


def dataset_out(request: Request, ds: Dataset) -> DatasetOut:
    root = request.scope.get("root_path", "")
    skipped = [{"name": n, "reason": r} for n, r in (ds.skipped or [])]
    return DatasetOut.model_validate({
        "id": ds.id, "name": ds.name, "n_images": ds.n_images, "n_skipped": len(skipped), "skipped": skipped[:1000],
        "archive_bytes": ds.archive_bytes, "uncompressed_bytes": ds.uncompressed_bytes, "created_at": ds.created_at,
        "links": {"self": f"{root}/datasets/{ds.id}", "jobs": f"{root}/jobs?dataset_id={ds.id}"},
    })


def _create(db: Database, settings: Settings, storage: Storage, owner: Owner, form: ReceivedForm) -> Dataset:
    archive = form.files.get("archive")
    if archive is None:
        raise UploadRejected("No archive: send the images as a zip/tar archive in the form field 'archive'.")
    dataset_id = new_id()
    ds_dir = storage.dataset_dir(dataset_id)
    try:
        checked = check_upload(archive.path, settings)
        stored = store_upload(checked, ds_dir)
        name = (form.fields.get("name") or archive.filename or "dataset")[:512]
        ds = Dataset(
            id=dataset_id, owner_id=owner.id, name=name, files_path=storage.rel(stored),
            archive_bytes=checked.archive_bytes, uncompressed_bytes=checked.uncompressed_bytes,
            n_images=checked.n_images, skipped=[list(x) for x in checked.skipped],
        )
        with db.session() as s:
            s.add(ds)
            s.commit()
            s.refresh(ds)
        return ds
    except BaseException:
        storage.remove_dataset_files(dataset_id)
        raise


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["archive"],
        "properties": {
            "archive": {"type": "string", "format": "binary", "description": "zip, tar, tar.gz, tar.bz2 or tar.xz"},
            "name": {"type": "string", "description": "display name (default: the file name)"},
        },
    }}}}},
    responses={401: ERRORS[401], 413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def create_dataset(request: Request, owner: OwnerDep, settings: SettingsDep, db: DatabaseDep,
                         storage: StorageDep, upload_dir: UploadDirDep):
    """Upload an archive of images: it is checked once (names, sizes, image types and pixel
    counts from the headers) and stored; then create jobs on it with `POST /jobs`
    `{"dataset_id": ..., "n_clusters": ...}`."""
    await run_in_threadpool(fairness.check_upload_budget, db, settings, owner, fairness.incoming_bytes(request))
    form = await receive_multipart(
        request, upload_dir, max_bytes=settings.max_upload_bytes,
        file_fields={"archive": settings.max_upload_bytes}, text_fields={"name"},
        chunk_bytes=settings.upload_chunk_bytes,
    )
    try:
        await run_in_threadpool(fairness.record_upload, db, settings, owner, form.received_bytes)
        ds = await run_in_threadpool(_create, db, settings, storage, owner, form)
    finally:
        await run_in_threadpool(form.cleanup)
    log.info("dataset %s created by %s (%d images)", ds.id, owner.name, ds.n_images)
    return dataset_out(request, ds)


@router.get("", response_model=DatasetList, responses={401: ERRORS[401]})
def list_datasets(
    request: Request, owner: OwnerDep, session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
):
    rows, total = crud.list_datasets(session, owner, limit, offset)
    return DatasetList(items=[dataset_out(request, d) for d in rows], total=total, limit=limit, offset=offset)


def _get_or_404(session, owner: Owner, dataset_id: str, for_update: bool = False) -> Dataset:
    ds = crud.get_dataset(session, owner, dataset_id, for_update=for_update)
    if ds is None:
        raise NotFound(f"No dataset {dataset_id!r} for this API key. List them with GET /datasets.")
    return ds


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(dataset_id: str, request: Request, owner: OwnerDep, session: ReadSessionDep):
    return dataset_out(request, _get_or_404(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204,
               responses={**ERRORS, 409: {"model": ErrorOut, "description": "A queued or running job uses it"}})
def delete_dataset(dataset_id: str, owner: OwnerDep, session: SessionDep, storage: StorageDep):
    """Delete a dataset and its files. 409 while a queued or running job uses it; finished
    jobs keep their results (their `dataset_id` becomes null)."""
    ds = _get_or_404(session, owner, dataset_id, for_update=True)
    active = repository.active_job_ids(session, dataset_id=ds.id)
    if active:
        raise Conflict(
            f"Dataset {ds.id} is used by {len(active)} queued or running job(s) ({', '.join(active[:5])}). "
            "Cancel them (POST /jobs/{id}/cancel) or wait until they finish, then delete the dataset."
        )
    crud.delete_dataset(session, ds)
    session.commit()
    storage.remove_dataset_files(ds.id)
    return Response(status_code=204)
