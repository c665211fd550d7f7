"""The reaper: a thread of the API process that, every ``SP2OT_REAPER_INTERVAL`` seconds,

* finds the running jobs whose heartbeat is older than ``SP2OT_HEARTBEAT_TIMEOUT`` (their
  worker died: killed, crashed, its machine lost) and ends them when a cancel was asked or
  their ``SP2OT_MAX_ATTEMPTS`` are used up, or queues them again (a new message to the queue);
* applies the retention settings (:func:`app.retention.cleanup`).

It does not depend on the broker re-delivering the dead worker's message (Redis does that
only after the visibility timeout, hours by default). Several API processes may each run
one: a job is locked while it is settled and skipped by the others.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from app.core.config import Settings
from app.core.db import Database
from app.jobs import repository
from app.jobs.queue import JobQueue
from app.retention import cleanup
from app.storage import Storage

log = logging.getLogger("sp2ot.reaper")


@dataclass
class ReaperPass:
    """What one pass did: job ids by their new status, and what the retention removed."""

    settled: dict[str, list[str]] = field(default_factory=dict)
    removed_jobs: list[str] = field(default_factory=list)
    removed_datasets: list[str] = field(default_factory=list)


class Reaper:
    def __init__(self, settings: Settings, db: Database, storage: Storage, queue: JobQueue):
        self.settings = settings
        self.db = db
        self.storage = storage
        self.queue = queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ReaperPass:
        out = ReaperPass()
        with self.db.read_session() as s:
            ids = repository.abandoned_job_ids(s, self.settings.heartbeat_timeout)
        for job_id in ids:
            try:
                with self.db.begin() as s:
                    status = repository.settle_abandoned(
                        s, job_id, heartbeat_timeout=self.settings.heartbeat_timeout,
                        max_attempts=self.settings.max_attempts,
                    )
                    if status == repository.QUEUED:
                        # Inside the transaction: when the send fails the job stays running, for the next pass.
                        self.queue.submit(job_id)
            except Exception:
                log.warning("job %s: cannot settle it now; next pass in %ss", job_id, self.settings.reaper_interval,
                            exc_info=True)
                continue
            if status is not None:
                log.warning("job %s had no live worker: now %s", job_id, status)
                out.settled.setdefault(status, []).append(job_id)
            if status in (repository.FAILED, repository.CANCELLED):
                self.queue.notify(job_id)  # its completion callback, if it has one (never raises)
        if self.settings.job_ttl_days or self.settings.dataset_ttl_days:
            report = cleanup(self.db, self.storage, self.settings)
            out.removed_jobs, out.removed_datasets = report.jobs, report.datasets
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval):
            try:
                self.run_once()
            except Exception:  # the database may be down for a moment: try again next pass
                log.warning("reaper pass failed", exc_info=True)

    def start(self) -> "Reaper":
        self._thread = threading.Thread(target=self._loop, name="sp2ot-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
