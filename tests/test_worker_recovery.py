"""Worker reliability: a worker SIGKILLed mid-job, redelivery to a new worker, idempotent
finalisation (no duplicated rows), superseded attempts, throttled progress."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import func, select, update

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ENGINE_OPTIONS,
    WorkerProcess,
    api_client,
    assignment_rows,
    create_key,
    image_set,
    make_zip,
    parse_labels_csv,
    auth,
    service_env,
    settings_from,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


def test_killed_worker_job_completes_on_a_new_worker(pg_url, redis_ns, tmp_path, engine_path):
    # A queue of its own, so that no other worker of the session takes the job.
    ns = {**redis_ns, "queue": f"{redis_ns['queue']}-kill-{uuid.uuid4().hex[:6]}"}
    env = service_env(data_dir=tmp_path, database_url=pg_url, redis=ns, estimator=engine_path)
    settings = settings_from(env)
    w1 = WorkerProcess(env, tmp_path / "w1.log", "victim").start()
    w2 = None
    try:
        with api_client(settings) as c:
            key = create_key(settings, "kill-test")
            w1.wait_ready(120)
            images = image_set(24)
            # enough epochs that training outlasts the poll that sees it start (then SIGKILL)
            r = upload_job(c, key, make_zip(images), n_clusters=3, **{**ENGINE_OPTIONS, "epochs": 400})
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            job = wait_for(c, key, jid, timeout=120, predicate=lambda j: j["progress"].get("stage") == "training")
            assert job["status"] == "running" and job["attempts"] == 1, job
            w1.kill()  # SIGKILL: no acknowledgement, no clean-up
            assert c.get(f"/jobs/{jid}", headers=auth(key)).json()["status"] == "running"
            w2 = WorkerProcess(env, tmp_path / "w2.log", "rescuer").start()
            w2.wait_ready(120)
            job = wait_for(c, key, jid, timeout=180)
            assert job["status"] == "succeeded", (job, w2.log())
            assert job["attempts"] == 2
            rows = assignment_rows(c.app.state.db, jid)
            assert len(rows) == 24
            assert [r[0] for r in rows] == list(range(24))
            assert sorted(r[1] for r in rows) == sorted(images)
            csv_rows = parse_labels_csv(c.get(f"/jobs/{jid}/labels.csv", headers=auth(key)).text)
            assert len(csv_rows) == 24 and len({r["filename"] for r in csv_rows}) == 24
    finally:
        w1.stop()
        if w2 is not None:
            w2.stop()


# ------------------------------------------------------------ in-process unit checks
@pytest.fixture
def pg_db(pg_url, tmp_path, monkeypatch):
    """Settings + Database on the session's PostgreSQL, with the fake estimator in-process."""
    from app.core.db import Database, run_migrations

    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    env = service_env(data_dir=tmp_path, database_url=pg_url, estimator="service_fixtures:FakeClustering")
    settings = settings_from(env)
    settings.ensure_dirs()
    run_migrations(settings)
    db = Database(settings)
    yield settings, db
    db.dispose()


def _make_job(settings, db, n_images=9, **kw):
    from app import crud
    from app.archives import prepare_upload
    from app.models import Job, new_id
    from app.storage import Storage

    storage = Storage(settings)
    job_id = new_id()
    archive = settings.tmp_dir / f"{job_id}.zip"
    archive.write_bytes(make_zip(image_set(n_images)))
    prepared = prepare_upload(archive, storage.job_dir(job_id) / "images", settings)
    with db.session() as s:
        owner, _ = crud.create_api_key(s, "unit")
        s.add(Job(id=job_id, owner_id=owner.id, input_path=storage.rel(prepared.root), n_images=prepared.n_images,
                  n_clusters=3, backbone="efficientnet_lite0", mode="fast", epochs=kw.get("epochs", 1),
                  formulation="sp2ot", seed=0, input_skipped=[], progress={}))
        s.commit()
    return job_id


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
