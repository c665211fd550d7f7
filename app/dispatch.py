"""Handing jobs to workers: a Celery queue, or threads inside the API process.

Both run the same function, :func:`worker.tasks.execute_job`.
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

log = logging.getLogger("sp2ot.dispatch")


class BrokerUnavailable(ApiError):
    status_code = 503


class Dispatcher:
    mode = "none"

    def submit(self, job_id: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def workers(self) -> tuple[bool, int, list[str], str | None]:  # pragma: no cover - interface
        raise NotImplementedError

    def broker(self) -> tuple[bool, str | None, float | None]:  # pragma: no cover - interface
        raise NotImplementedError

    def recover(self, db: Database) -> None:
        pass

    def shutdown(self) -> None:
        pass


class EmbeddedDispatcher(Dispatcher):
    """Jobs run in a thread pool of the API process (``SP2OT_BROKER_URL`` empty)."""

    mode = "in-process"

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.pool = ThreadPoolExecutor(settings.embedded_workers, thread_name_prefix="sp2ot-job")
        self.name = f"in-process@{socket.gethostname()}"
        self._stopping = threading.Event()

    def submit(self, job_id: str, *, takeover: bool = False) -> None:
        from worker.tasks import execute_job

        def run() -> None:
            if self._stopping.is_set():
                return
            try:
                execute_job(job_id, db=self.db, settings=self.settings, worker_name=self.name, takeover=takeover)
            except Exception:  # execute_job records failures itself; this is a last resort
                log.exception("job %s crashed", job_id)

        self.pool.submit(run)

    def recover(self, db: Database) -> None:
        """After a restart, run again the jobs this process had queued or was running."""
        from sqlalchemy import select

        from app.models import Job, JobStatus

        with db.session() as s:
            ids = s.scalars(
                select(Job.id).where(Job.status.in_(JobStatus.ACTIVE)).order_by(Job.created_at)
            ).all()
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


class CeleryDispatcher(Dispatcher):
    mode = "celery"

    def __init__(self, settings: Settings):
        from worker.celery_app import make_celery

        self.settings = settings
        self.app = make_celery(settings)

    def submit(self, job_id: str) -> None:
        try:
            self.app.send_task(
                "sp2ot.run_job",
                args=[job_id],
                queue=self.settings.queue,
                task_id=f"job-{job_id}-{int(time.time() * 1000)}",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as e:
            log.error("cannot queue job %s: %s", job_id, e)
            raise BrokerUnavailable(
                "The job queue (broker) is unreachable, so the job was not created. Try again in a moment."
            ) from e

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


def make_dispatcher(settings: Settings, db: Database) -> Dispatcher:
    if settings.embedded:
        return EmbeddedDispatcher(settings, db)
    return CeleryDispatcher(settings)
