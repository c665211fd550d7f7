"""The Celery worker: the Celery app and its one task, a thin shell over
:func:`app.jobs.runner.execute_job`. Run it with ``sp2ot worker`` (which starts
``celery -A worker.celery_app worker`` with the service's options).

Its tasks: run a job (then one attempt of its completion callback, retries queued with a
countdown), assign new images to a finished job's clusters, deliver a callback.

The app's configuration and the tasks' names are the API's (``app.jobs.queue``); what a run
guarantees is described in ``app/jobs/runner.py``.
"""
from __future__ import annotations

import logging
import os
import threading

# Idle OpenMP threads sleep instead of spinning (see app/cli.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import signals  # noqa: E402

from app.core.config import Settings, get_settings  # noqa: E402
from app.core.db import Database, run_migrations  # noqa: E402
from app.jobs import callbacks  # noqa: E402
from app.jobs.assigning import execute_assign  # noqa: E402
from app.jobs.queue import (  # noqa: E402
    FINAL_OUTCOMES,
    RUN_ASSIGN_TASK,
    RUN_JOB_TASK,
    SEND_CALLBACK_TASK,
    make_celery,
    send_callback_task,
)
from app.jobs.runner import execute_job  # noqa: E402

log = logging.getLogger("sp2ot.worker")

celery_app = make_celery(get_settings(), set_as_current=True)
app = celery_app  # `celery -A worker.celery_app` finds `app` / `celery_app`

_db: Database | None = None
_db_pid: int | None = None
_db_lock = threading.Lock()


def worker_database(settings: Settings) -> Database:
    """One engine per worker process (a forked pool process makes its own)."""
    global _db, _db_pid
    with _db_lock:
        if _db is None or _db_pid != os.getpid():
            _db, _db_pid = Database(settings), os.getpid()
        return _db


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: str) -> str:
    """Run the job. A message for a job another live worker runs (a duplicate delivery) is
    acknowledged and dropped: if that worker dies, the API's reaper queues the job again."""
    settings = get_settings()
    db = worker_database(settings)
    outcome = execute_job(job_id, db=db, settings=settings, worker_name=self.request.hostname or "celery")
    if outcome in FINAL_OUTCOMES:
        _callback_attempt(job_id, settings, db)
    return outcome


def _callback_attempt(job_id: str, settings: Settings, db: Database) -> None:
    """One delivery of the job's callback now (at most SP2OT_CALLBACK_TIMEOUT seconds; nothing
    when none is due); a retry is a task queued with the back-off as its countdown."""
    try:
        result = callbacks.deliver_once(job_id, db=db, settings=settings)
        if not result.done:
            send_callback_task(celery_app, settings, job_id, countdown=result.retry_in)
    except Exception:  # the job is final whatever happens to its callback
        log.warning("job %s: callback attempt failed", job_id, exc_info=True)


@celery_app.task(name=SEND_CALLBACK_TASK, ignore_result=True)
def send_callback(job_id: str) -> None:
    """Deliver a final job's callback (a retry, or a job ended by the API: cancelled while queued,
    or settled by the reaper)."""
    settings = get_settings()
    _callback_attempt(job_id, settings, worker_database(settings))


@celery_app.task(name=RUN_ASSIGN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_assign(self, request_id: str) -> str:
    """Assign new images to a succeeded job's clusters with its saved model."""
    settings = get_settings()
    return execute_assign(request_id, db=worker_database(settings), settings=settings)


@signals.worker_init.connect
def _migrate_on_start(**_kwargs) -> None:
    """Bring the schema up to date before consuming (the API does the same)."""
    settings = get_settings()
    settings.ensure_dirs()
    if settings.run_migrations:
        run_migrations(settings)
    log.info(
        "sp2ot worker: queue=%s device=%s visibility_timeout=%ss",
        settings.queue, settings.device, settings.visibility_timeout,
    )
