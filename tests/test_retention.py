"""Retention (``SP2OT_JOB_TTL_DAYS``, ``SP2OT_DATASET_TTL_DAYS``): what expires goes, rows and
files; what is recent or in use stays; off by default. Run by ``sp2ot cleanup`` and by the
API's reaper. And the upload folders of processes that died are removed at start-up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    REPO,
    api_client,
    job_state,
    make_job_row,
    make_zip,
    image_set,
    service_env,
    settings_from,
    subprocess_env,
    unit_database,
)

pytest_plugins = ["service_fixtures"]

DAY = timedelta(days=1)


def _ago(days: float):
    from app.models import utcnow

    return utcnow() - days * DAY


def _finished(settings, db, days_ago: float, status: str = "succeeded", **columns) -> str:
    """A job that finished ``days_ago`` days ago, with one result row and its files."""
    from app.jobs.repository import bulk_insert_assignments

    job_id = make_job_row(settings, db, status=status, attempts=1, finished_at=_ago(days_ago), **columns)
    with db.begin() as s:
        bulk_insert_assignments(s, job_id, ["a.png"], [0], [1.0])
    return job_id


def _dataset(settings, db, days_unused: float) -> str:
    from app import crud
    from app.models import Dataset, new_id
    from app.storage import Storage

    storage = Storage(settings)
    ds_id = new_id()
    images = storage.dataset_dir(ds_id) / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"x")
    with db.session() as s:
        owner, _ = crud.create_api_key(s, "retention")
        s.add(Dataset(id=ds_id, owner_id=owner.id, name="d", files_path=storage.rel(images), n_images=1,
                      skipped=[], created_at=_ago(days_unused), last_used_at=_ago(days_unused)))
        s.commit()
    return ds_id


def _exists(db, model, row_id) -> bool:
    with db.session() as s:
        return s.get(model, row_id) is not None


def _assignments(db, job_id) -> int:
    from app.models import Assignment

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Assignment).where(Assignment.job_id == job_id))


@pytest.fixture
def retention_db(tmp_path):
    settings, db = unit_database(service_env(data_dir=tmp_path, SP2OT_JOB_TTL_DAYS="7",
                                             SP2OT_DATASET_TTL_DAYS="30"))
    yield settings, db
    db.dispose()


def test_finished_jobs_older_than_the_ttl_go_with_their_rows_and_files(retention_db):
    from app.retention import cleanup
    from app.storage import Storage

    settings, db = retention_db
    storage = Storage(settings)
    old_ok, old_failed, old_cancelled = (_finished(settings, db, 8, s) for s in ("succeeded", "failed", "cancelled"))
    recent = _finished(settings, db, 6)
    running = make_job_row(settings, db, status="running", attempts=1, started_at=_ago(20))
    queued = make_job_row(settings, db, created_at=_ago(20))
    report = cleanup(db, storage, settings)
    assert sorted(report.jobs) == sorted([old_ok, old_failed, old_cancelled]) and report.datasets == []
    for gone in (old_ok, old_failed, old_cancelled):
        assert job_state(db, gone) is None and _assignments(db, gone) == 0
        assert not storage.job_dir(gone).exists()
    for kept in (recent, running, queued):
        assert job_state(db, kept) is not None and storage.job_dir(kept).is_dir()
    assert _assignments(db, recent) == 1


def test_unused_datasets_older_than_the_ttl_go_unless_a_job_uses_them(retention_db):
    from app.models import Dataset
    from app.retention import cleanup
    from app.storage import Storage

    settings, db = retention_db
    storage = Storage(settings)
    unused, recent, in_use, with_finished_job = (_dataset(settings, db, d) for d in (31, 29, 40, 40))
    active = make_job_row(settings, db, dataset_id=in_use)  # queued on it
    finished = _finished(settings, db, 1, dataset_id=with_finished_job)  # kept by the job TTL
    report = cleanup(db, storage, settings)
    assert sorted(report.datasets) == sorted([unused, with_finished_job]) and report.jobs == []
    assert not _exists(db, Dataset, unused) and not storage.dataset_dir(unused).exists()
    assert _exists(db, Dataset, recent) and _exists(db, Dataset, in_use) and storage.dataset_dir(in_use).is_dir()
    # The finished job keeps its results and loses the link.
    assert job_state(db, finished).dataset_id is None and _assignments(db, finished) == 1
    assert job_state(db, active).status == "queued"


def test_a_job_created_from_a_dataset_counts_as_a_use(tmp_path, monkeypatch):
    """Uploaded 40 days ago, used today (POST /jobs on it): it stays."""
    from app.models import Dataset
    from app.retention import cleanup
    from app.storage import Storage

    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    env = service_env(data_dir=tmp_path, SP2OT_DATASET_TTL_DAYS="30", estimator="service_fixtures:FakeClustering")
    settings, db = unit_database(env)
    try:
        with api_client(settings_from(env)) as c:
            r = c.post("/datasets", files={"archive": ("a.zip", make_zip(image_set(6)), "application/zip")})
            assert r.status_code == 201, r.text
            ds_id = r.json()["id"]
            with db.begin() as s:
                s.get(Dataset, ds_id).last_used_at = _ago(40)
            assert c.post("/jobs", json={"dataset_id": ds_id, "n_clusters": 2}).status_code == 202
        with db.session() as s:
            assert s.get(Dataset, ds_id).last_used_at > _ago(1).replace(tzinfo=None)  # SQLite: naive UTC
        assert cleanup(db, Storage(settings), settings).datasets == []
        assert _exists(db, Dataset, ds_id)
    finally:
        db.dispose()


def test_retention_is_off_by_default(tmp_path):
    from app.retention import cleanup
    from app.storage import Storage

    settings, db = unit_database(service_env(data_dir=tmp_path))
    try:
        assert settings.job_ttl_days == 0 and settings.dataset_ttl_days == 0
        job = _finished(settings, db, 3650)
        ds = _dataset(settings, db, 3650)
        assert cleanup(db, Storage(settings), settings).jobs == []
        assert job_state(db, job) is not None and Storage(settings).dataset_dir(ds).is_dir()
    finally:
        db.dispose()


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=str(REPO), env=subprocess_env(env),
                          capture_output=True, text=True, timeout=120)


def test_sp2ot_cleanup_command(tmp_path):
    env = service_env(data_dir=tmp_path)
    settings, db = unit_database(env)
    try:
        old, recent = _finished(settings, db, 10), _finished(settings, db, 2)
        ds = _dataset(settings, db, 100)
        p = _cli(env, "cleanup")
        assert p.returncode == 0 and "retention is off" in p.stderr, p.stderr
        assert job_state(db, old) is not None
        p = _cli({**env, "SP2OT_JOB_TTL_DAYS": "7"}, "cleanup")
        assert p.returncode == 0 and "deleted 1 job(s) and 0 dataset(s)" in p.stderr, p.stderr
        assert job_state(db, old) is None and job_state(db, recent) is not None
        p = _cli(env, "cleanup", "--dataset-ttl-days", "90", "--job-ttl-days", "1")
        assert p.returncode == 0 and "deleted 1 job(s) and 1 dataset(s)" in p.stderr, p.stderr
        assert job_state(db, recent) is None and not (tmp_path / "datasets" / ds).exists()
        p = _cli(env, "cleanup", "--job-ttl-days", "-1")
        assert p.returncode == 2 and "not a number of days >= 0" in p.stderr
    finally:
        db.dispose()


def test_the_api_reaper_applies_the_retention(tmp_path):
    env = service_env(data_dir=tmp_path, SP2OT_JOB_TTL_DAYS="1", SP2OT_REAPER_INTERVAL="0.2")
    settings, db = unit_database(env)
    try:
        with api_client(settings_from(env)):
            old = _finished(settings, db, 2)
            recent = _finished(settings, db, 0.5)
            deadline = time.time() + 30
            while time.time() < deadline and job_state(db, old) is not None:
                time.sleep(0.1)
            assert job_state(db, old) is None and job_state(db, recent) is not None
    finally:
        db.dispose()


# --------------------------------------------------------------------- upload folders
_HOLDER = """
import sys, time
from pathlib import Path
from app.core.config import Settings
from app.storage import Storage
area = Storage(Settings(data_dir=sys.argv[1])).open_upload_area()
(area.path / "upload-1").mkdir()
(area.path / "upload-1" / "part").write_bytes(b"half an upload")
print(area.path, flush=True)
time.sleep(600)
"""


def test_upload_folders_of_dead_processes_are_removed_at_start_up(tmp_path):
    """Another API process (alive) keeps its upload folder; once it is SIGKILLed, the next
    start-up removes it. Other leftovers go after 24 h, as before."""
    env = service_env(data_dir=tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=str(REPO),
                              env=subprocess_env(env), stdout=subprocess.PIPE, text=True)
    try:
        other = holder.stdout.readline().strip()
        assert other and os.path.isdir(other), other
        stale = tmp / "upload-legacy"
        stale.mkdir()
        os.utime(stale, (time.time() - 2 * 86400,) * 2)
        fresh = tmp / "upload-recent"
        fresh.mkdir()
        with api_client(settings_from(env)) as c:
            own = c.app.state.upload_area.path
            assert own.is_dir() and own.parent == tmp
            assert os.path.isdir(other), "the upload folder of a live process was removed"
            assert not stale.exists() and fresh.exists()
        assert not own.exists()  # a clean shutdown removes its own
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert os.path.isdir(other)
        with api_client(settings_from(env)):
            assert not os.path.exists(other)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
