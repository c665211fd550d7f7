"""Curation of a succeeded job's clusters by a person: rename, merge, move images, undo the last
edit, reset. The only writer of ``cluster_names``, ``curation_edits``, ``curation_moves`` and of
``assignments.cluster`` after a job succeeded.

Each edit is checked whole before anything is written and runs in the caller's transaction on
the job row locked (``repository.get_job_for_update``), so an edit naming a missing cluster or
image changes nothing and two edits of one job never interleave. A merge or a move records,
per image, the cluster it came from: undo puts those images back, reset puts every image back
in the cluster of its first recorded move (its engine cluster) and forgets names and edits.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, insert, literal, select, update
from sqlalchemy.orm import Session

from app import results
from app.errors import ApiError, Conflict
from app.jobs.repository import JobRecord
from app.models import Assignment, ClusterName, CurationEdit, CurationMove, JobStatus

MAX_NAME = 100
MAX_IMAGES_PER_MOVE = 10_000
NEW_CLUSTER = "new"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CHUNK = 500


class CurationRejected(ApiError):
    """A curation request that names something the job does not have (nothing was changed)."""

    status_code = 422


def require_succeeded(job: JobRecord) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"Job {job.id} is {job.status}: only the clusters of a succeeded job can be curated.")


def _existing_clusters(session: Session, job: JobRecord) -> int:
    return results.cluster_count(job.n_clusters, results.cluster_sizes(session, job.id))


def _check_cluster(value: Any, count: int, what: str = "cluster") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CurationRejected(f"{what} must be a cluster number, got {value!r}.")
    if not 0 <= value < count:
        raise CurationRejected(f"The job has no cluster {value} ({what}): its clusters are 0 to {count - 1}.")
    return value


def _new_edit(session: Session, job_id: str, kind: str, detail: dict[str, Any]) -> int:
    edit = CurationEdit(job_id=job_id, kind=kind, detail=detail)
    session.add(edit)
    session.flush()
    return edit.id


def _set_cluster(session: Session, job_id: str, idxs: list[int], cluster: int) -> None:
    for i in range(0, len(idxs), _CHUNK):
        session.execute(update(Assignment).where(Assignment.job_id == job_id, Assignment.idx.in_(idxs[i:i + _CHUNK]))
                        .values(cluster=cluster))


def _set_name(session: Session, job_id: str, cluster: int, name: str | None) -> None:
    session.execute(delete(ClusterName).where(ClusterName.job_id == job_id, ClusterName.cluster == cluster))
    if name:
        session.add(ClusterName(job_id=job_id, cluster=cluster, name=name))
        session.flush()


# ------------------------------------------------------------------------------ edits
def clean_name(name: Any) -> str:
    if not isinstance(name, str):
        raise CurationRejected("name must be a text.")
    name = " ".join(_CONTROL.sub(" ", name).split())
    if not name:
        raise CurationRejected("name must not be empty.")
    if len(name) > MAX_NAME:
        raise CurationRejected(f"name is longer than {MAX_NAME} characters.")
    return name


def rename(session: Session, job: JobRecord, cluster: Any, name: Any) -> dict[str, Any]:
    require_succeeded(job)
    cluster = _check_cluster(cluster, _existing_clusters(session, job))
    name = clean_name(name)
    previous = results.cluster_names(session, job.id).get(cluster)
    _set_name(session, job.id, cluster, name)
    detail = {"cluster": cluster, "name": name, "previous": previous}
    _new_edit(session, job.id, "rename", detail)
    return detail


def merge(session: Session, job: JobRecord, clusters: Any, into: Any) -> dict[str, Any]:
    """Move every image of ``clusters`` into cluster ``into``."""
    require_succeeded(job)
    count = _existing_clusters(session, job)
    into = _check_cluster(into, count, "into")
    if not isinstance(clusters, list) or not clusters:
        raise CurationRejected("clusters must be a non-empty list of cluster numbers.")
    sources = sorted({_check_cluster(c, count, "clusters") for c in clusters} - {into})
    if not sources:
        raise CurationRejected("Name at least one cluster other than the one to merge into.")
    edit_id = _new_edit(session, job.id, "merge", {"clusters": sources, "into": into})
    where = (Assignment.job_id == job.id, Assignment.cluster.in_(sources))
    session.execute(insert(CurationMove).from_select(
        ["edit_id", "idx", "job_id", "from_cluster"],
        select(literal(edit_id), Assignment.idx, literal(job.id), Assignment.cluster).where(*where)))
    moved = session.execute(update(Assignment).where(*where).values(cluster=into)).rowcount
    detail = {"clusters": sources, "into": into, "count": int(moved or 0)}
    session.execute(update(CurationEdit).where(CurationEdit.id == edit_id).values(detail=detail))
    return detail


def move(session: Session, job: JobRecord, filenames: Any, to: Any) -> dict[str, Any]:
    """Move the named images to cluster ``to`` (``"new"``: a new, empty cluster)."""
    require_succeeded(job)
    if not isinstance(filenames, list) or not filenames or not all(isinstance(f, str) for f in filenames):
        raise CurationRejected("images must be a non-empty list of file names.")
    if len(filenames) > MAX_IMAGES_PER_MOVE:
        raise CurationRejected(f"Move at most {MAX_IMAGES_PER_MOVE} images at once.")
    count = _existing_clusters(session, job)
    to = count if to == NEW_CLUSTER else _check_cluster(to, count, "to")
    wanted = list(dict.fromkeys(filenames))
    found = results.images_by_name(session, job.id, wanted)
    missing = [f for f in wanted if f not in found]
    if missing:
        shown = ", ".join(repr(f) for f in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CurationRejected(f"The job has no image {shown}. Nothing was moved.")
    moving = [im for im in found.values() if im.cluster != to]
    edit_id = _new_edit(session, job.id, "move", {"to": to, "count": len(moving)})
    if moving:
        session.execute(insert(CurationMove), [
            {"edit_id": edit_id, "idx": im.idx, "job_id": job.id, "from_cluster": im.cluster} for im in moving])
        _set_cluster(session, job.id, [im.idx for im in moving], to)
    return {"to": to, "count": len(moving)}


def undo(session: Session, job: JobRecord) -> dict[str, Any]:
    """Revert the last edit."""
    require_succeeded(job)
    edit = session.execute(select(CurationEdit).where(CurationEdit.job_id == job.id)
                           .order_by(CurationEdit.id.desc()).limit(1)).scalar_one_or_none()
    if edit is None:
        raise Conflict("There is no curation edit to undo.")
    if edit.kind == "rename":
        _set_name(session, job.id, edit.detail["cluster"], edit.detail.get("previous"))
    else:
        back: dict[int, list[int]] = defaultdict(list)
        for idx, source in session.execute(select(CurationMove.idx, CurationMove.from_cluster)
                                           .where(CurationMove.edit_id == edit.id)):
            back[source].append(idx)
        for source, idxs in back.items():
            _set_cluster(session, job.id, idxs, source)
    session.execute(delete(CurationMove).where(CurationMove.edit_id == edit.id))
    session.execute(delete(CurationEdit).where(CurationEdit.id == edit.id))
    return {"undone": edit.kind, **edit.detail}


def reset(session: Session, job: JobRecord) -> dict[str, Any]:
    """Back to the engine's clusters: every moved image to where it was first, names and edits gone."""
    require_succeeded(job)
    original: dict[int, int] = {}
    for idx, source in session.execute(select(CurationMove.idx, CurationMove.from_cluster)
                                       .where(CurationMove.job_id == job.id).order_by(CurationMove.edit_id.desc())):
        original[idx] = source  # the earliest edit is read last and wins
    back: dict[int, list[int]] = defaultdict(list)
    for idx, source in original.items():
        back[source].append(idx)
    for source, idxs in back.items():
        _set_cluster(session, job.id, idxs, source)
    edits = session.execute(delete(CurationEdit).where(CurationEdit.job_id == job.id)).rowcount
    session.execute(delete(CurationMove).where(CurationMove.job_id == job.id))
    session.execute(delete(ClusterName).where(ClusterName.job_id == job.id))
    return {"edits_removed": int(edits or 0), "images_restored": len(original)}


def history(session: Session, job_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The newest edits first."""
    rows = session.execute(select(CurationEdit.id, CurationEdit.kind, CurationEdit.detail, CurationEdit.created_at)
                           .where(CurationEdit.job_id == job_id).order_by(CurationEdit.id.desc()).limit(limit))
    return [{"id": r.id, "kind": r.kind, "detail": r.detail, "created_at": r.created_at} for r in rows]


def describe(edit: dict[str, Any], names: dict[int, str]) -> str:
    """An edit in words, for the pages."""
    d = edit["detail"]
    if edit["kind"] == "rename":
        return f"renamed cluster {d['cluster']} to “{d['name']}”"
    if edit["kind"] == "merge":
        into = results.display_name(d["into"], names)
        return f"merged clusters {', '.join(map(str, d['clusters']))} into {into} ({d.get('count', 0)} images)"
    return f"moved {d.get('count', 0)} image(s) to {results.display_name(d['to'], names)}"
