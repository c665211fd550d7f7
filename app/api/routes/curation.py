"""/jobs/{id}/curation: rename and merge clusters, move images, undo the last edit, reset.

Every edit is all or nothing (``app.curation``): a request naming a missing cluster or image
answers 422 and changes nothing; a job that has not succeeded answers 409.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app import curation, results
from app.api.deps import OwnerDep, SessionDep
from app.core.security import Owner
from app.errors import NotFound
from app.jobs import repository
from app.jobs.repository import JobRecord
from app.schemas import ErrorOut

router = APIRouter(prefix="/jobs", tags=["curation"])
ERRORS = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    403: {"model": ErrorOut, "description": "Missing or wrong CSRF token (browser sessions)"},
    404: {"model": ErrorOut, "description": "No such job for this API key"},
    409: {"model": ErrorOut, "description": "The job has not succeeded, or there is nothing to undo"},
    422: {"model": ErrorOut, "description": "A cluster or image the job does not have; nothing was changed"},
}


class RenameIn(BaseModel):
    cluster: Any = Field(description="Cluster number")
    name: Any = Field(description="New name (1-100 characters)")


class MergeIn(BaseModel):
    clusters: Any = Field(description="Cluster numbers to merge")
    into: Any = Field(description="Cluster number that receives their images")


class MoveIn(BaseModel):
    images: Any = Field(description="File names, as in labels.csv")
    to: Any = Field(description='Cluster number, or "new" for a new cluster')


def _locked(session, owner: Owner, job_id: str) -> JobRecord:
    job = repository.get_job_for_update(session, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key. List your jobs with GET /jobs.")
    return job


def state(session, job: JobRecord) -> dict[str, Any]:
    info = results.curation_info(session, job.id)
    names = results.cluster_names(session, job.id)
    return {
        "job_id": job.id, "curated": info.curated, "edits": info.edits,
        "clusters": [{"id": c.id, "name": c.name, "size": c.size}
                     for c in results.clusters(session, job.id, job.n_clusters)],
        "history": [{**e, "text": curation.describe(e, names)} for e in curation.history(session, job.id)],
    }


def _apply(session, owner: Owner, job_id: str, edit, *args) -> dict[str, Any]:
    job = _locked(session, owner, job_id)
    try:
        done = edit(session, job, *args)
        session.flush()
        out = {"done": done, **state(session, job)}
        session.commit()
        return out
    except BaseException:
        session.rollback()
        raise


@router.get("/{job_id}/curation", responses=ERRORS)
def get_curation(job_id: str, owner: OwnerDep, session: SessionDep):
    """The clusters as they are now (names, sizes) and the edits, newest first."""
    job = repository.get_job(session, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key. List your jobs with GET /jobs.")
    curation.require_succeeded(job)
    return state(session, job)


@router.post("/{job_id}/curation/rename", responses=ERRORS)
def rename_cluster(job_id: str, body: RenameIn, owner: OwnerDep, session: SessionDep):
    return _apply(session, owner, job_id, curation.rename, body.cluster, body.name)


@router.post("/{job_id}/curation/merge", responses=ERRORS)
def merge_clusters(job_id: str, body: MergeIn, owner: OwnerDep, session: SessionDep):
    return _apply(session, owner, job_id, curation.merge, body.clusters, body.into)


@router.post("/{job_id}/curation/move", responses=ERRORS)
def move_images(job_id: str, body: MoveIn, owner: OwnerDep, session: SessionDep):
    return _apply(session, owner, job_id, curation.move, body.images, body.to)


@router.post("/{job_id}/curation/undo", responses=ERRORS)
def undo_edit(job_id: str, owner: OwnerDep, session: SessionDep):
    return _apply(session, owner, job_id, curation.undo)


@router.post("/{job_id}/curation/reset", responses=ERRORS)
def reset_curation(job_id: str, owner: OwnerDep, session: SessionDep):
    return _apply(session, owner, job_id, curation.reset)
