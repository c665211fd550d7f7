"""Retention: finished jobs and unused datasets are deleted, rows and files, after
``SP2OT_JOB_TTL_DAYS`` / ``SP2OT_DATASET_TTL_DAYS`` (0 = never, the default).

Run by the API's reaper at each pass and by ``sp2ot cleanup``. A job counts from when it
finished; a dataset from its upload or the last job created from it, and never goes while a
queued or running job uses it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from app import crud
from app.core.config import Settings
from app.core.db import Database
from app.jobs import repository
from app.models import utcnow
from app.storage import Storage

log = logging.getLogger("sp2ot.retention")

BATCH = 500


@dataclass
class CleanupReport:
    """Ids of what was deleted."""

    jobs: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


def cleanup(db: Database, storage: Storage, settings: Settings, *, now: datetime | None = None) -> CleanupReport:
    """Delete what the retention settings say has expired."""
    now = now or utcnow()
    report = CleanupReport()
    if settings.job_ttl_days:
        report.jobs = _remove_jobs(db, storage, now - timedelta(days=settings.job_ttl_days))
    if settings.dataset_ttl_days:
        report.datasets = _remove_datasets(db, storage, now - timedelta(days=settings.dataset_ttl_days))
    if report.jobs or report.datasets:
        log.info("retention: deleted %d job(s) and %d dataset(s)", len(report.jobs), len(report.datasets))
    return report


def _remove_jobs(db: Database, storage: Storage, finished_before: datetime) -> list[str]:
    removed: list[str] = []
    while True:
        with db.session() as s:
            ids = repository.expired_job_ids(s, finished_before, limit=BATCH)
        for job_id in ids:
            with db.begin() as s:
                repository.delete_job(s, job_id)
            storage.remove_job_files(job_id)
        removed += ids
        if len(ids) < BATCH:
            return removed


def _remove_datasets(db: Database, storage: Storage, used_before: datetime) -> list[str]:
    removed = []
    with db.session() as s:
        ids = crud.unused_dataset_ids(s, used_before, limit=BATCH)
    for dataset_id in ids:
        with db.begin() as s:
            ds = crud.lock_unused_dataset(s, dataset_id, used_before)
            if ds is None or repository.active_job_ids(s, dataset_id=dataset_id):
                continue
            crud.delete_dataset(s, ds)
        storage.remove_dataset_files(dataset_id)
        removed.append(dataset_id)
    return removed
