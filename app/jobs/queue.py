"""Handing jobs to workers: a Celery queue (``SP2OT_BROKER_URL`` set), or threads of the API
process (embedded mode). Both end in :func:`app.jobs.runner.execute_job`.

The API sends the Celery task by its name, :data:`RUN_JOB_TASK`; ``worker/celery_app.py``
registers the task under that name on an app made by :func:`make_celery`, so the API never
imports the worker.

Reliability settings of the Celery app: tasks are acknowledged only when finished
(``acks_late``) and given back to the queue if the worker process is lost, a worker holds one
task at a time (``worker_prefetch_multiplier=1``), and a task whose worker died is delivered
again after ``SP2OT_BROKER_VISIBILITY_TIMEOUT`` seconds (Redis). Recovery does not wait for
that: the API's reaper (``app.jobs.reaper``) re-queues a job whose heartbeat stopped.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from app.core.config import Settings
from app.core.db import Database
from app.errors import ApiError
from app.jobs import callbacks, repository
from app.jobs.assigning import execute_assign
from app.jobs.runner import execute_job

log = logging.getLogger("sp2ot.queue")

RUN_JOB_TASK = "sp2ot.run_job"
RUN_ASSIGN_TASK = "sp2ot.run_assign"  # new images into a succeeded job's clusters (app.jobs.assigning)
SEND_CALLBACK_TASK = "sp2ot.send_callback"  # a final job's completion callback (app.jobs.callbacks)
#: The outcomes of execute_job after which a job is final (its callback may be due).
FINAL_OUTCOMES = frozenset({"succeeded", "failed", "cancelled", "skipped"})


class BrokerUnavailable(ApiError):
    status_code = 503


def celery_config(settings: Settings) -> dict:
    """The Celery configuration of the API (sender) and of the workers."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.broker_restore_interval,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    if settings.broker_key_prefix:
        transport["global_keyprefix"] = settings.broker_key_prefix
    return dict(
        broker_url=settings.broker_url or "memory://",
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )


def make_celery(settings: Settings, *, set_as_current: bool = False):
    """A Celery app configured by :func:`celery_config` (Celery is imported on use: the
    embedded mode does not need it)."""
    from celery import Celery

    app = Celery("sp2ot", set_as_current=set_as_current)
    app.conf.update(celery_config(settings))
    return app


def send_callback_task(celery_app, settings: Settings, job_id: str, countdown: float = 0) -> None:
    """Queue the delivery of the job's callback (``SEND_CALLBACK_TASK``, run by a worker)."""
    celery_app.send_task(SEND_CALLBACK_TASK, args=[job_id], queue=settings.queue, countdown=countdown or None,
                         task_id=f"callback-{job_id}-{int(time.time() * 1000)}")


class JobQueue:
    """Where the API sends a job to be run, and what it can tell about the workers."""

    mode = "none"

    def submit(self, job_id: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def submit_assign(self, request_id: str) -> None:  # pragma: no cover - interface
        """Run an assign request (``app.jobs.assigning``)."""
        raise NotImplementedError

    def notify(self, job_id: str) -> None:  # pragma: no cover - interface
        """Deliver the job's completion callback if one is due (``app.jobs.callbacks``), in the
        background; never raises."""
        raise NotImplementedError

    def workers(self) -> tuple[bool, int, list[str], str | None]:  # pragma: no cover - interface
        """(ok, count, names, detail)."""
        raise NotImplementedError

    def broker(self) -> tuple[bool, str | None, float | None]:  # pragma: no cover - interface
        """(ok, detail, latency in ms)."""
        raise NotImplementedError

    def recover(self, db: Database) -> None:
        """Called once at start-up."""

    def shutdown(self) -> None:
        pass


class EmbeddedQueue(JobQueue):
    """Jobs run in a thread pool of the API process (``SP2OT_BROKER_URL`` empty)."""

    mode = "in-process"

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.pool = ThreadPoolExecutor(settings.embedded_workers, thread_name_prefix="sp2ot-job")
        # Callbacks wait between their retries: threads of their own, so that no job waits for them.
        self.callback_pool = ThreadPoolExecutor(2, thread_name_prefix="sp2ot-callback")
        self.name = f"in-process@{socket.gethostname()}"
        self._stopping = threading.Event()

    def submit(self, job_id: str, *, takeover: bool = False) -> None:
        def run() -> None:
            if self._stopping.is_set():
                return
            try:
                outcome = execute_job(job_id, db=self.db, settings=self.settings, worker_name=self.name,
                                      takeover=takeover)
            except Exception:  # execute_job records failures itself; this is a last resort
                log.exception("job %s crashed", job_id)
                outcome = "failed"
            if outcome in FINAL_OUTCOMES:
                self.notify(job_id)

        self.pool.submit(run)

    def submit_assign(self, request_id: str) -> None:
        def run() -> None:
            if self._stopping.is_set():
                return
            try:
                execute_assign(request_id, db=self.db, settings=self.settings)
            except Exception:  # execute_assign records failures itself; this is a last resort
                log.exception("assign request %s crashed", request_id)

        self.pool.submit(run)

    def notify(self, job_id: str) -> None:
        def run() -> None:
            try:
                callbacks.deliver(job_id, db=self.db, settings=self.settings, stop=self._stopping)
            except Exception:
                log.exception("job %s: callback delivery crashed", job_id)

        try:
            self.callback_pool.submit(run)
        except RuntimeError:  # shutting down
            log.warning("job %s: callback not sent, the server is stopping", job_id)

    def recover(self, db: Database) -> None:
        """After a restart, run again the jobs this process had queued or was running (its
        threads died with it, so a running job is taken over at once)."""
        with db.session() as s:
            ids = repository.active_job_ids(s)
        for job_id in ids:
            log.info("resuming job %s after a restart", job_id)
            self.submit(job_id, takeover=True)

    def workers(self):
        return True, self.settings.embedded_workers, [self.name], None

    def broker(self):
        return True, "in-process (no broker)", None

    def shutdown(self) -> None:
        self._stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.callback_pool.shutdown(wait=False, cancel_futures=True)


class CeleryQueue(JobQueue):
    mode = "celery"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = make_celery(settings)

    def submit(self, job_id: str) -> None:
        self._send(RUN_JOB_TASK, job_id, f"job-{job_id}", "job")

    def submit_assign(self, request_id: str) -> None:
        self._send(RUN_ASSIGN_TASK, request_id, f"assign-{request_id}", "assign request")

    def _send(self, task: str, object_id: str, task_prefix: str, what: str) -> None:
        try:
            self.app.send_task(
                task,
                args=[object_id],
                queue=self.settings.queue,
                task_id=f"{task_prefix}-{int(time.time() * 1000)}",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as e:
            log.error("cannot queue %s %s: %s", what, object_id, e)
            raise BrokerUnavailable(
                f"The job queue (broker) is unreachable, so the {what} was not created. Try again in a moment."
            ) from e

    def notify(self, job_id: str) -> None:
        try:
            send_callback_task(self.app, self.settings, job_id)
        except Exception:  # the job's state is what matters; its callback stays pending
            log.warning("job %s: cannot queue its callback", job_id, exc_info=True)

    def broker(self):
        t0 = time.perf_counter()
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=1)
            return True, None, (time.perf_counter() - t0) * 1000
        except Exception as e:
            return False, f"broker unreachable: {type(e).__name__}", None

    def workers(self):
        try:
            replies = self.app.control.ping(timeout=0.5) or []
        except Exception as e:
            return False, 0, [], f"cannot ping workers: {type(e).__name__}"
        names = sorted(name for r in replies for name in r)
        # Only the workers consuming this deployment's queue count.
        return bool(names), len(names), names, None if names else "no worker answered the ping"

    # No shutdown(): kombu's producer pools are global per broker URL, closing them here
    # would break another app instance of the same process (tests); the process exit closes them.


def make_queue(settings: Settings, db: Database) -> JobQueue:
    if settings.embedded:
        return EmbeddedQueue(settings, db)
    return CeleryQueue(settings)
