"""The job state machine (``app.jobs.repository``) and the reaper (``app.jobs.reaper``), in
process on a SQLite file of their own (no other API's reaper sees these jobs). The same
reaper against real, SIGKILLed Celery workers on PostgreSQL and Redis is in
``test_worker_recovery.py``."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    api_client,
    job_state,
    make_job_row,
    service_env,
    settings_from,
    unit_database,
)

pytest_plugins = ["service_fixtures"]

LONG_AGO = timedelta(hours=1)


def _rows(db, job_id):
    from app.models import Assignment

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Assignment).where(Assignment.job_id == job_id))


class RecordingQueue:
    """Stands for the job queue: records what the reaper sends (or refuses to take it)."""

    mode = "test"

    def __init__(self, fail: bool = False):
        self.sent: list[str] = []
        self.notified: list[str] = []  # jobs whose completion callback was asked for
        self.fail = fail

    def notify(self, job_id: str) -> None:
        self.notified.append(job_id)

    def submit(self, job_id: str) -> None:
        from app.jobs.queue import BrokerUnavailable

        if self.fail:
            raise BrokerUnavailable("broker down (test)")
        self.sent.append(job_id)


def _reaper(settings, db, queue):
    from app.jobs.reaper import Reaper
    from app.storage import Storage

    return Reaper(settings, db, Storage(settings), queue)


def _abandoned(settings, db, **columns) -> str:
    """A running job whose worker stopped beating an hour ago."""
    from app.models import JobStatus, utcnow

    values = {"status": JobStatus.RUNNING, "attempts": 1, "heartbeat_at": utcnow() - LONG_AGO,
              "started_at": utcnow() - LONG_AGO, "worker": "gone@host", **columns}
    return make_job_row(settings, db, **values)


# ------------------------------------------------------------------------ state machine
def test_the_transition_table():
    from app.jobs.repository import TRANSITIONS
    from app.models import JobStatus

    assert TRANSITIONS == {
        "queued": {"running", "cancelled", "failed"},
        "running": {"succeeded", "failed", "cancelled", "queued"},
        "succeeded": set(), "failed": set(), "cancelled": set(),
    }
    assert set(TRANSITIONS) == set(JobStatus.ALL)


@pytest.mark.parametrize("source,target", [
    ("succeeded", "running"), ("failed", "queued"), ("cancelled", "running"), ("queued", "succeeded"),
    ("running", "running"), ("queued", "queued"), ("nonsense", "queued"),
])
def test_an_illegal_transition_raises_and_writes_nothing(sqlite_db, source, target):
    from app.jobs.repository import IllegalTransition, _transition

    settings, db = sqlite_db
    job_id = make_job_row(settings, db, status=source if source != "nonsense" else "queued")
    with pytest.raises(IllegalTransition, match=f"cannot go from '{source}' to '{target}'"):
        with db.begin() as s:
            _transition(s, job_id, 0, source, target)
    assert job_state(db, job_id).status == (source if source != "nonsense" else "queued")


def test_every_write_of_an_attempt_is_fenced_by_its_token(sqlite_db):
    """Attempt 1 is given up (its worker presumed dead) and attempt 2 starts: nothing attempt 1
    still tries (heartbeat, progress, ending, results) changes the job."""
    from app.jobs import repository
    from app.models import Job, JobStatus

    settings, db = sqlite_db
    job_id = make_job_row(settings, db)
    claim = dict(worker_name="w", heartbeat_timeout=60, max_attempts=3)
    with db.begin() as s:
        first = repository.claim(s, job_id, **claim)
    assert first.attempt == 1 and job_state(db, job_id).status == "running"
    with db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=None))
    with db.begin() as s:
        assert repository.settle_abandoned(s, job_id, heartbeat_timeout=60, max_attempts=3) == JobStatus.QUEUED
    with db.begin() as s:  # the old attempt, still alive after all, tries to go on
        assert not repository.beat(s, job_id, 1)
        assert not repository.save_progress(s, job_id, 1, {"stage": "training"})
        assert repository.stop_reason(s, job_id, 1) == "superseded"
        assert not repository.end_attempt(s, job_id, 1, JobStatus.FAILED, "late")
    assert job_state(db, job_id).status == "queued" and job_state(db, job_id).error is None
    with db.begin() as s:
        second = repository.claim(s, job_id, **claim)
    assert second.attempt == 2
    with db.begin() as s:  # a duplicate delivery while attempt 2 runs: busy, nothing changes
        assert repository.claim(s, job_id, **claim) == repository.BUSY
    with db.begin() as s:
        assert not repository.record_success(
            s, job_id, 1, summary={}, history=[], metrics=None, progress={}, filenames=["a"], labels=[0],
            confidences=[1.0])
        assert repository.record_success(
            s, job_id, 2, summary={"n_images": 1}, history=[], metrics=None, progress={"stage": "done"},
            filenames=["a"], labels=[0], confidences=[1.0])
    job = job_state(db, job_id)
    assert job.status == "succeeded" and job.attempts == 2 and _rows(db, job_id) == 1


def test_cancel_of_a_queued_job_is_at_once_and_of_a_running_one_a_flag(sqlite_db):
    from app.jobs import repository

    settings, db = sqlite_db
    queued = make_job_row(settings, db)
    running = make_job_row(settings, db, status="running", attempts=1)
    with db.session() as s:
        assert repository.request_cancel(s, queued).status == "cancelled"
        job = repository.request_cancel(s, running)
    assert job.status == "running" and job.cancel_requested


# ------------------------------------------------------------------------------ reaper
def test_reaper_requeues_a_job_whose_worker_is_gone_and_it_then_succeeds(sqlite_db):
    from app.jobs.runner import execute_job
    from app.models import utcnow

    settings, db = sqlite_db
    job_id = _abandoned(settings, db)
    # A heartbeat in the future: alive however slow this test runs.
    alive = make_job_row(settings, db, status="running", attempts=1, heartbeat_at=utcnow() + LONG_AGO)
    waiting = make_job_row(settings, db)
    queue = RecordingQueue()
    done = _reaper(settings, db, queue).run_once()
    assert done.settled == {"queued": [job_id]} and queue.sent == [job_id]
    job = job_state(db, job_id)
    assert job.status == "queued" and job.attempts == 1 and job.progress["stage"] == "queued"
    assert job_state(db, alive).status == "running" and job_state(db, waiting).status == "queued"
    # The message the reaper sent is run by a worker: a new attempt, one row per image.
    assert execute_job(job_id, db=db, settings=settings) == "succeeded"
    assert job_state(db, job_id).attempts == 2 and _rows(db, job_id) == 9
    assert _reaper(settings, db, queue).run_once().settled == {}


def test_reaper_fails_a_job_whose_worker_died_max_attempts_times(sqlite_db):
    settings, db = sqlite_db
    job_id = _abandoned(settings, db, attempts=settings.max_attempts)
    queue = RecordingQueue()
    assert _reaper(settings, db, queue).run_once().settled == {"failed": [job_id]}
    job = job_state(db, job_id)
    assert job.status == "failed" and job.finished_at is not None and queue.sent == []
    assert queue.notified == [job_id]  # a job ended here gets its callback too
    assert f"started {settings.max_attempts} times and its worker died each time" in job.error


def test_reaper_ends_a_cancelled_job_that_has_no_worker(sqlite_db):
    settings, db = sqlite_db
    job_id = _abandoned(settings, db, cancel_requested=True)
    queue = RecordingQueue()
    assert _reaper(settings, db, queue).run_once().settled == {"cancelled": [job_id]}
    job = job_state(db, job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.progress["stage"] == "cancelled"
    assert queue.sent == [] and queue.notified == [job_id]


def test_a_failed_send_leaves_the_job_running_for_the_next_pass(sqlite_db):
    settings, db = sqlite_db
    job_id = _abandoned(settings, db)
    assert _reaper(settings, db, RecordingQueue(fail=True)).run_once().settled == {}
    assert job_state(db, job_id).status == "running"  # not queued without a message
    queue = RecordingQueue()
    assert _reaper(settings, db, queue).run_once().settled == {"queued": [job_id]} and queue.sent == [job_id]
    assert queue.notified == []  # re-queued: not final, no callback


def test_health_reports_jobs_without_a_live_worker(tmp_path, monkeypatch):
    """An API whose reaper waits (long interval): /health shows the abandoned job; one pass
    of the reaper re-queues it to the embedded threads, which run it."""
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    env = service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering", SP2OT_REAPER_INTERVAL="3600")
    settings, db = unit_database(env)
    try:
        with api_client(settings_from(env)) as c:
            job_id = _abandoned(settings, db)  # after the start-up recovery of the embedded mode
            health = c.get("/health").json()
            assert health["status"] == "degraded", health
            assert health["jobs"] == {"ok": False, "without_worker": 1, "without_worker_ids": [job_id],
                                      "detail": health["jobs"]["detail"]}
            assert "without a live worker" in health["jobs"]["detail"]
            assert c.app.state.reaper.run_once().settled == {"queued": [job_id]}
            deadline = time.time() + 60
            while time.time() < deadline and job_state(db, job_id).status != "succeeded":
                time.sleep(0.1)
            assert job_state(db, job_id).status == "succeeded" and job_state(db, job_id).attempts == 2
            health = c.get("/health").json()
            assert health["status"] == "ok" and health["jobs"]["without_worker"] == 0, health
    finally:
        db.dispose()


def test_the_reaper_loop_runs_in_the_embedded_api(tmp_path, monkeypatch):
    """No manual pass: the API's own loop finds the abandoned job within its interval."""
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    env = service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering", SP2OT_REAPER_INTERVAL="0.2")
    settings, db = unit_database(env)
    try:
        with api_client(settings_from(env)):
            job_id = _abandoned(settings, db)  # after the start-up recovery: only the reaper can see it
            deadline = time.time() + 60
            while time.time() < deadline and job_state(db, job_id).status != "succeeded":
                time.sleep(0.1)
            job = job_state(db, job_id)
            assert job.status == "succeeded" and job.attempts == 2 and _rows(db, job_id) == 9
    finally:
        db.dispose()
