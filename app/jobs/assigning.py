"""Runs one assign request: new images put into the clusters of a succeeded job by the job's
saved model (``model.pt``, :func:`app.jobs.artifacts.save_model`), without training:
:func:`execute_assign`, called by the Celery task ``sp2ot.run_assign`` and by the embedded
worker threads (``app.jobs.queue``).

It runs in a worker, not in the API, because it extracts the images' features with the job's
backbone (torch; the API process never imports it). The images are read through the manifest
the API wrote when it checked the upload, each decoded once to verify it (damaged pixel data is
skipped and reported). The result is a CSV ``filename,cluster,confidence,outlier_score,outlier``
(:func:`sp2ot_engine.io.labels_csv.write_assignments`) next to the upload, in
``<job folder>/assign/<request id>/``; the upload is removed once the request is final.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from app.core.config import Settings
from app.core.db import Database
from app.jobs import artifacts, repository
from app.jobs.runner import load_estimator_class
from app.models import JobStatus
from app.storage import Storage, open_stored
from sp2ot_engine.io.labels_csv import write_assignments

log = logging.getLogger("sp2ot.worker")

ASSIGNMENTS_CSV = "labels.csv"
MAX_SKIPPED_REPORTED = 1000


def assign_dir(storage: Storage, job_id: str, request_id: str) -> Path:
    """The folder of one assign request: its upload and, once done, its CSV."""
    return storage.job_dir(job_id) / "assign" / request_id


def execute_assign(request_id: str, *, db: Database, settings: Settings) -> str:
    """Run the request to its end. Returns succeeded, failed, or skipped (nothing to run)."""
    with db.begin() as s:
        req = repository.claim_assign_request(s, request_id, stale_after=settings.task_time_limit)
    if req is None:
        return "skipped"
    storage = Storage(settings)
    folder = assign_dir(storage, req.job_id, req.id)
    started = time.perf_counter()
    try:
        try:
            from celery.exceptions import SoftTimeLimitExceeded
        except ImportError:  # pragma: no cover
            SoftTimeLimitExceeded = TimeoutError  # type: ignore[misc,assignment]
        try:
            summary = _assign(storage, settings, req, folder)
        except SoftTimeLimitExceeded:
            return _fail(db, req, f"Assigning the images exceeded the time limit of {settings.task_soft_time_limit} s "
                                  "(SP2OT_TASK_SOFT_TIME_LIMIT). Send fewer images at once.")
        except ValueError as e:  # the engine's user-facing input errors
            return _fail(db, req, str(e) or "invalid input")
        except MemoryError:
            return _fail(db, req, "The worker ran out of memory. Send fewer or smaller images at once.")
        except Exception as e:
            log.exception("assign request %s failed", request_id)
            msg = str(e).splitlines()[0][:500] if str(e) else ""
            return _fail(db, req, f"Internal error while assigning the images ({type(e).__name__}: {msg}).")
        summary["seconds"] = round(time.perf_counter() - started, 3)
        with db.begin() as s:
            repository.end_assign_request(s, req.id, req.attempts, JobStatus.SUCCEEDED, summary=summary)
        log.info("assign request %s of job %s: %d images assigned", req.id, req.job_id, summary["n_assigned"])
        return "succeeded"
    finally:
        stored = storage.abs(req.input_path)
        storage.remove(stored)
        for extra in stored.parent.glob(stored.name + ".*"):  # its manifest
            storage.remove(extra)


def _fail(db: Database, req: repository.AssignRecord, message: str) -> str:
    with db.begin() as s:
        repository.end_assign_request(s, req.id, req.attempts, JobStatus.FAILED, error=message)
    return "failed"


def _assign(storage: Storage, settings: Settings, req: repository.AssignRecord, folder: Path) -> dict:
    model = storage.job_dir(req.job_id) / artifacts.MODEL_FILE
    if not model.is_file():
        raise ValueError("This job has no saved model (it was made before models were kept): cluster the images "
                         "again to assign new ones.")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    est = load_estimator_class(settings.estimator).load(model)
    est.device, est.num_workers = settings.device, settings.num_workers
    with open_stored(storage.abs(req.input_path), verify=True) as images:
        result = est.predict_assignments(images)
    tmp = folder / f"{ASSIGNMENTS_CSV}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write_assignments(tmp, result.names, result.labels, result.confidences, result.outlier_scores,
                          result.outliers)
        os.replace(tmp, folder / ASSIGNMENTS_CSV)
    finally:
        tmp.unlink(missing_ok=True)
    counts = [0] * int(est.n_clusters)
    for c in result.labels:
        counts[int(c)] += 1
    skipped = sorted({(str(n), str(r)) for n, r in [*req.input_skipped, *result.skipped]})
    return {"n_assigned": len(result.names), "cluster_counts": counts, "n_skipped": len(skipped),
            "skipped": [{"name": n, "reason": r} for n, r in skipped[:MAX_SKIPPED_REPORTED]]}
