"""GET /jobs/{id}/export?format=json|zip|labelstudio|csv: the (curated) clusters, streamed."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import exports
from app.api.deps import DatabaseDep, OwnerDep, StorageDep
from app.api.routes.jobs import ERRORS, SPREADSHEET_SAFE, _get_job_or_404, _require_success
from app.core.db import Database
from app.core.security import Owner
from app.jobs.repository import JobRecord
from app.results import curation_info
from app.schemas import ErrorOut

router = APIRouter(prefix="/jobs", tags=["exports"])

MEDIA = {"json": "application/json", "labelstudio": "application/json", "csv": "text/csv; charset=utf-8",
         "zip": "application/zip"}
SUFFIX = {"json": "clusters.json", "labelstudio": "labelstudio.json", "csv": "labels.csv", "zip": "clusters.zip"}


def _checked_job(db: Database, owner: Owner, job_id: str) -> tuple[JobRecord, bool]:
    with db.read_session() as s:
        job = _get_job_or_404(s, owner, job_id)
        _require_success(job, "exports")
        return job, curation_info(s, job.id).curated


@router.get("/{job_id}/export", response_class=StreamingResponse,
            responses={**ERRORS, 409: {"model": ErrorOut, "description": "The job has not succeeded"},
                       200: {"description": "The export, in the format asked for",
                             "content": {media.split(";")[0]: {} for media in MEDIA.values()}}})
async def export_job(
    job_id: str, request: Request, owner: OwnerDep, db: DatabaseDep, storage: StorageDep,
    format: Annotated[Literal["json", "zip", "labelstudio", "csv"], Query(description="What to download")] = "json",
    spreadsheet_safe: Annotated[bool, Query(description="With format=csv: " + SPREADSHEET_SAFE)] = False,
):
    """The job's clusters as they are now (curated, if a person edited them; the answer's
    `X-SP2OT-Curated` header and the file name say so). `csv`: as labels.csv; `json`: images and
    clusters with names and representatives; `labelstudio`: Label Studio import tasks (one per
    image, the cluster name as a predicted choice scored by the confidence); `zip`: one folder
    per cluster holding the original images."""
    job, curated = await run_in_threadpool(_checked_job, db, owner, job_id)
    if format == "csv":
        body = exports.csv_stream(db, job, curated, spreadsheet_safe)
    elif format == "json":
        body = exports.json_stream(db, job)
    elif format == "labelstudio":
        base = str(request.base_url).rstrip("/")
        body = exports.label_studio_stream(db, job, f"{base}/ui/jobs/{job.id}/original/{{idx}}")
    else:
        body = exports.zip_stream(db, job, storage.abs(job.input_path))
    name = f"sp2ot-{job.id}-{'curated-' if curated else ''}{SUFFIX[format]}"
    return StreamingResponse(body, media_type=MEDIA[format], headers={
        "Content-Disposition": f'attachment; filename="{name}"', "X-SP2OT-Curated": "true" if curated else "false"})
