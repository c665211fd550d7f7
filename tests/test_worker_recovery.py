"""Worker reliability: a worker SIGKILLed mid-job, redelivery to a new worker, idempotent
finalisation (no duplicated rows), superseded attempts, throttled progress."""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select, update

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ENGINE_OPTIONS,
    WorkerProcess,
    api_client,
    assignment_rows,
    create_key,
    fresh_database,
    image_set,
    make_job_row,
    make_zip,
    parse_labels_csv,
    auth,
    service_env,
    settings_from,
    unit_database,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


def _production_env(db_url, redis_ns, data_dir, engine_path, **extra):
    """API and worker settings on ``db_url`` with a queue of their own, so that no other
    worker of the session takes the job."""
    ns = {**redis_ns, "queue": f"{redis_ns['queue']}-kill-{uuid.uuid4().hex[:6]}"}
    return service_env(data_dir=data_dir, database_url=db_url, redis=ns, estimator=engine_path, **extra)


def _start_job_and_kill_worker_group(c, key, worker: WorkerProcess, **job) -> str:
    """Queue a long job, wait until its worker trains, then SIGKILL the worker's whole process
    group (no acknowledgement, no clean-up). Returns the job id."""
    worker.wait_ready(120)
    r = job.pop("request")() if "request" in job else upload_job(
        c, key, make_zip(job.pop("images")), n_clusters=3, **{**ENGINE_OPTIONS, "epochs": 400})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    # enough epochs that training outlasts the poll that sees it start
    found = wait_for(c, key, jid, timeout=120, predicate=lambda j: j["progress"].get("stage") == "training")
    assert found["status"] == "running" and found["attempts"] == 1, found
    worker.kill()
    assert c.get(f"/jobs/{jid}", headers=auth(key)).json()["status"] == "running"
    return jid


def _assert_one_row_per_image(c, key, jid, images):
    rows = assignment_rows(c.app.state.db, jid)
    assert len(rows) == len(images)
    assert [r[0] for r in rows] == list(range(len(images)))
    assert sorted(r[1] for r in rows) == sorted(images)
    csv_rows = parse_labels_csv(c.get(f"/jobs/{jid}/labels.csv", headers=auth(key)).text)
    assert len(csv_rows) == len(images) and len({r["filename"] for r in csv_rows}) == len(images)


@contextmanager
def _api_and_workers(env, tmp_path):
    """The API (in process) on ``env``, an API key, and ``spawn(name, pool)`` starting worker
    processes (stopped at the end)."""
    settings = settings_from(env)
    workers: list[WorkerProcess] = []

    def spawn(name: str, pool: str = "solo") -> WorkerProcess:
        workers.append(WorkerProcess(env, tmp_path / f"{name}.log", name, pool=pool).start())
        return workers[-1]

    try:
        with api_client(settings) as c:
            yield c, create_key(settings, "kill-test"), spawn
    finally:
        for w in workers:
            w.stop()


def test_killed_worker_job_completes_on_a_new_worker(fresh_pg, redis_ns, tmp_path, engine_path):
    """A short broker visibility timeout (6 s): the broker delivers the message again."""
    env = _production_env(fresh_pg, redis_ns, tmp_path, engine_path)
    with _api_and_workers(env, tmp_path) as (c, key, spawn):
        images = image_set(24)
        jid = _start_job_and_kill_worker_group(c, key, spawn("victim"), images=images)
        rescuer = spawn("rescuer")
        rescuer.wait_ready(120)
        job = wait_for(c, key, jid, timeout=180)
        assert job["status"] == "succeeded", (job, rescuer.log())
        assert job["attempts"] == 2
        _assert_one_row_per_image(c, key, jid, images)


# The reaper's bound in these tests: a heartbeat older than 3 s, looked for every 0.5 s
# (benchmarks/worker_recovery.py measures the default 60 s / 15 s).
REAPER_ENV = {"SP2OT_HEARTBEAT_TIMEOUT": "3", "SP2OT_REAPER_INTERVAL": "0.5"}


def _default_visibility(env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    del env["SP2OT_BROKER_VISIBILITY_TIMEOUT"]  # Redis delivers the dead worker's message again after hours
    assert settings_from(env).visibility_timeout > 6 * 3600
    return env


def test_reaper_requeues_the_job_of_a_killed_worker_group(fresh_pg, redis_ns, tmp_path, engine_path, caplog):
    """Production mode at the default visibility timeout: the whole worker process group
    (prefork parent and pool child) is SIGKILLed mid-job, a new worker starts, and the API's
    reaper, not the broker, queues the job again: it succeeds with one row per image."""
    env = _default_visibility(_production_env(fresh_pg, redis_ns, tmp_path, engine_path, **REAPER_ENV))
    with _api_and_workers(env, tmp_path) as (c, key, spawn):
        images = image_set(24)
        jid = _start_job_and_kill_worker_group(c, key, spawn("victim", "prefork"), images=images)
        killed_at = time.time()
        rescuer = spawn("rescuer")
        job = wait_for(c, key, jid, timeout=240)
        assert job["status"] == "succeeded", (job, rescuer.log())
        assert job["attempts"] == 2 and time.time() - killed_at < 240
        assert f"job {jid} had no live worker: now queued" in caplog.text
        _assert_one_row_per_image(c, key, jid, images)
        health = c.get("/health").json()
        assert health["jobs"]["without_worker"] == 0 and health["status"] == "ok", health


def test_cancel_without_a_live_worker_ends_the_job_and_frees_its_dataset(fresh_pg, redis_ns, tmp_path,
                                                                        engine_path):
    """The worker group is SIGKILLed and no worker comes back: a cancel still takes effect
    (the reaper ends the job), after which its dataset can be deleted."""
    env = _default_visibility(_production_env(fresh_pg, redis_ns, tmp_path, engine_path, **REAPER_ENV))
    with _api_and_workers(env, tmp_path) as (c, key, spawn):
        r = c.post("/datasets", files={"archive": ("shapes.zip", make_zip(image_set(24)), "application/zip")},
                   headers=auth(key))
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        jid = _start_job_and_kill_worker_group(c, key, spawn("victim", "prefork"), request=lambda: c.post(
            "/jobs", json={"dataset_id": ds, "n_clusters": 3, **{**ENGINE_OPTIONS, "epochs": 400}},
            headers=auth(key)))
        assert c.delete(f"/datasets/{ds}", headers=auth(key)).status_code == 409  # still used
        cancelled_at = time.time()
        r = c.post(f"/jobs/{jid}/cancel", headers=auth(key))
        assert r.status_code == 200 and r.json()["cancel_requested"] and r.json()["status"] == "running"
        job = wait_for(c, key, jid, timeout=240)
        assert job["status"] == "cancelled" and time.time() - cancelled_at < 240, job
        assert job["finished_at"] and job["summary"] is None
        assert c.delete(f"/datasets/{ds}", headers=auth(key)).status_code == 204
        assert c.get(f"/datasets/{ds}", headers=auth(key)).status_code == 404
        assert not (tmp_path / "datasets" / ds).exists()


# ------------------------------------------------------------ in-process unit checks
@pytest.fixture(scope="module")
def unit_pg_url():
    """A database of this module's unit checks: no API's reaper of another test sees their
    hand-made running jobs."""
    with fresh_database("sp2ot_unit") as url:
        yield url


@pytest.fixture
def pg_db(unit_pg_url, tmp_path, monkeypatch):
    """Settings + Database on PostgreSQL, with the fake estimator in-process."""
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    settings, db = unit_database(
        service_env(data_dir=tmp_path, database_url=unit_pg_url, estimator="service_fixtures:FakeClustering"))
    yield settings, db
    db.dispose()


def _make_job(settings, db, n_images=9, **kw):
    return make_job_row(settings, db, n_images, **kw)


def _count(db, job_id):
    from app.models import Assignment

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Assignment).where(Assignment.job_id == job_id))


def test_redelivered_finished_job_is_not_run_again(pg_db):
    from app.jobs.runner import execute_job

    settings, db = pg_db
    job_id = _make_job(settings, db)
    assert execute_job(job_id, db=db, settings=settings) == "succeeded"
    assert _count(db, job_id) == 9
    # The same message delivered again (e.g. the worker died before acknowledging it).
    assert execute_job(job_id, db=db, settings=settings) == "skipped"
    assert _count(db, job_id) == 9


def test_rerun_after_a_crash_replaces_rows(pg_db):
    """A job whose worker died after writing rows (simulated) is re-run from scratch; the
    old rows are replaced, not duplicated."""
    from app.models import Assignment, Job, JobStatus
    from app.jobs.runner import execute_job

    settings, db = pg_db
    job_id = _make_job(settings, db)
    assert execute_job(job_id, db=db, settings=settings) == "succeeded"
    with db.begin() as s:  # pretend it is still running, abandoned long ago, with a stray row
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, heartbeat_at=None))
        s.execute(update(Assignment).where(Assignment.job_id == job_id, Assignment.idx == 0).values(cluster=99))
    assert execute_job(job_id, db=db, settings=settings) == "succeeded"
    rows = assignment_rows(db, job_id)
    assert len(rows) == 9 and all(r[2] != 99 for r in rows)
    with db.session() as s:
        assert s.get(Job, job_id).attempts == 2


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(pg_db):
    from app.models import Job, JobStatus
    from app.jobs.runner import execute_job

    settings, db = pg_db
    job_id = _make_job(settings, db)
    with db.begin() as s:  # the third worker died too (e.g. killed by the hard time limit)
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, heartbeat_at=None,
                                                             attempts=settings.max_attempts))
    assert execute_job(job_id, db=db, settings=settings) == "skipped"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FAILED and "started 3 times" in job.error
    assert _count(db, job_id) == 0


def test_running_job_with_a_live_heartbeat_is_not_taken_over(pg_db):
    from app.models import Job, JobStatus, utcnow
    from app.jobs.runner import execute_job

    settings, db = pg_db
    job_id = _make_job(settings, db)
    with db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, heartbeat_at=utcnow(), attempts=1))
    assert execute_job(job_id, db=db, settings=settings) == "busy"
    assert _count(db, job_id) == 0


def test_superseded_attempt_writes_nothing(pg_db, monkeypatch):
    """Attempt 1 is presumed dead and attempt 2 takes over: attempt 1 stops at its next
    check and never writes results; the job ends with one set of rows."""
    from app.models import Job
    from app.jobs.runner import execute_job

    settings, db = pg_db
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.05")
    job_id = _make_job(settings, db, epochs=20)  # 100 steps x 50 ms
    outcomes = {}
    t1 = threading.Thread(target=lambda: outcomes.__setitem__(1, execute_job(job_id, db=db, settings=settings)))
    t1.start()
    deadline = time.time() + 20
    while time.time() < deadline:
        with db.session() as s:
            if (s.get(Job, job_id).progress or {}).get("stage") == "training":
                break
        time.sleep(0.05)
    outcomes[2] = execute_job(job_id, db=db, settings=settings, takeover=True)
    t1.join(30)
    assert outcomes == {1: "superseded", 2: "succeeded"}
    assert _count(db, job_id) == 9
    with db.session() as s:
        assert s.get(Job, job_id).attempts == 2


def test_progress_writes_are_throttled(pg_db):
    from app.jobs.runner import JobRun

    settings, db = pg_db
    run = JobRun(db, settings.model_copy(update={"progress_interval": 0.5}), "x", 1)
    writes = []
    run.write_progress = writes.append  # type: ignore[method-assign]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:
        run.progress({"stage": "training", "percent": 10.0, "epoch": 1, "loss": float("nan"), "rho": 0.2})
    run.progress({"stage": "predicting", "percent": 99})  # a stage change is always written
    assert 2 <= len(writes) <= 5, len(writes)
    assert writes[0]["loss"] is None and writes[-1]["stage"] == "predicting"
