"""Fixtures and helpers of the service tests (API, worker, compose).

Loaded by the service test modules with ``pytest_plugins = ["service_fixtures"]`` (no
conftest.py). What they need from this machine:

* PostgreSQL on 127.0.0.1:5432 (``SP2OT_TEST_PG``, default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``): a uniquely named database is
  created for the test session and dropped after;
* Redis on 127.0.0.1:6379 (``SP2OT_TEST_REDIS``, default ``redis://127.0.0.1:6379/0``): every
  key of the session carries a unique prefix (removed after), and the queue name is unique;
* a Celery worker subprocess (``python -m app.cli worker --pool solo``, which execs
  ``celery -A worker.celery_app worker``) started by the tests.

Tests needing PostgreSQL or Redis skip, with the reason, when these do not answer.
"""
from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PG_ADMIN_URL = os.environ.get("SP2OT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SP2OT_TEST_REDIS", "redis://127.0.0.1:6379/0")

# Small, fast engine settings for end-to-end jobs (seconds on a CPU).
ENGINE_OPTIONS = {"backbone": "efficientnet_lite0", "mode": "fast", "epochs": 2}


# ---------------------------------------------------------------------------------- images
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def shape_png(shape: str, colour: tuple[int, int, int], size: int = 48, seed: int = 0) -> bytes:
    """A tiny PNG: a coloured shape on a light background, slightly jittered."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    bg = tuple(235 + rng.randint(-15, 15) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = rng.randint(4, 10)
    box = (m, m, size - m - rng.randint(0, 4), size - m - rng.randint(0, 4))
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_set(n: int = 24, prefix: str = "img", folder: str = "") -> dict[str, bytes]:
    """``n`` images of 3 kinds (red circles, green squares, blue triangles): name -> PNG."""
    kinds = [("circle", "red"), ("square", "green"), ("triangle", "blue")]
    out = {}
    for i in range(n):
        shape, colour = kinds[i % 3]
        name = f"{folder}{prefix}_{i:03d}_{colour}_{shape}.png"
        out[name] = shape_png(shape, COLOURS[colour], seed=i)
    return out


def truth_csv(files: dict[str, str | bytes]) -> bytes:
    lines = ["filename,label"]
    for name in files:
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".png") and "_" in base:
            lines.append(f"{name},{base.rsplit('_', 1)[-1][:-4]}")
    return ("\n".join(lines) + "\n").encode()


def make_zip(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(files: dict[str, bytes], mode: str = "w:gz", links: dict[str, tuple[str, str]] | None = None) -> bytes:
    """``links``: name -> ("sym"|"hard", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


# ----------------------------------------------------------------------- fake estimator
class FakeClustering:
    """Follows the engine contract, for tests that need a controllable duration (e.g. a job
    slow enough to be cancelled). Clusters by dominant colour. It trains ``epochs`` x
    SP2OT_FAKE_STEPS_PER_EPOCH steps of SP2OT_FAKE_STEP_DELAY seconds (environment, so that a
    worker subprocess can use it too)."""

    def __init__(self, n_clusters, backbone="efficientnet_lite0", mode="fast", epochs=None, formulation="sp2ot",
                 init="auto", device="auto", random_state=0, batch_size=64, num_workers=0, k_min=None, k_max=None):
        # n_clusters=None: "chooses" k_min (a curve peaking there), as the engine reports a choice
        if n_clusters is None:
            self.k_curve_ = {k: 1.0 / (1 + abs(k - k_min)) for k in range(k_min, k_max + 1)}
            self.k_criterion_ = "modularity"
            n_clusters = k_min
        if n_clusters < 2:
            raise ValueError("n_clusters must be >= 2")
        self.n_clusters = self.n_clusters_ = n_clusters
        self.epochs = epochs or 2

    def fit(self, path, progress=None, should_stop=None):
        """``path``: an ImageCollection (what the service's runner passes: read through the
        upload's manifest, used as it is and left open, as the real estimator does), a manifest
        or a folder/archive."""
        import numpy as np

        from sp2ot_engine import Cancelled
        from sp2ot_engine.io.archive import Manifest, upload_of_manifest
        from sp2ot_engine.io.collection import ImageCollection, scan_images

        owned = not isinstance(path, ImageCollection)
        upload = upload_of_manifest(path) if owned else None
        coll = (path if not owned else
                ImageCollection.from_manifest(upload, Manifest.read(path), verify=True) if upload is not None
                else scan_images(path))
        if len(coll) < self.n_clusters:
            raise ValueError(f"n_clusters={self.n_clusters} but only {len(coll)} images")
        steps = self.epochs * int(os.environ.get("SP2OT_FAKE_STEPS_PER_EPOCH", "5"))
        delay = float(os.environ.get("SP2OT_FAKE_STEP_DELAY", "0.05"))
        self.history_ = []
        for step in range(steps):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped")
            time.sleep(delay)
            epoch = step * self.epochs // steps
            if progress:
                progress({"stage": "training", "percent": 100 * step / steps, "epoch": epoch, "step": step,
                          "total_steps": steps, "loss": 1.0 / (step + 1), "rho": min(1.0, 0.1 + step / steps)})
            if step == steps - 1 or (step + 1) * self.epochs // steps != epoch:
                self.history_.append({"epoch": epoch, "loss": 1.0 / (step + 1), "rho": min(1.0, 0.1 + step / steps)})
        labels = []
        for i in range(len(coll)):
            arr = np.asarray(coll.load(i), dtype=float)
            mask = arr.sum(axis=2) < 600
            colour = arr[mask].mean(axis=0) if mask.any() else arr.reshape(-1, 3).mean(axis=0)
            labels.append(int(np.argmax(colour)) % self.n_clusters)
        self.filenames_ = list(coll.names)
        self.labels_ = np.array(labels, dtype=np.int64)
        self.features_ = np.eye(self.n_clusters, dtype=np.float32)[self.labels_] + 0.01 * np.arange(len(labels))[:, None]
        self.confidences_ = np.linspace(0.95, 0.5, len(labels))
        self.cluster_sizes_ = np.bincount(self.labels_, minlength=self.n_clusters)
        # flags like the engine's: the last image an outlier, every image after the first a duplicate of it
        # when the file names say "copy"
        self.outlier_scores_ = np.r_[np.zeros(len(labels) - 1), [9.0]]
        self.outliers_ = self.outlier_scores_ > 3.5
        self.duplicate_of_ = np.array([0 if i and "copy" in n else -1 for i, n in enumerate(coll.names)], dtype=np.int64)
        self.skipped_ = list(coll.skipped)
        if owned:
            coll.close()
        if progress:
            progress({"stage": "done", "percent": 100})
        return self


def real_engine_available() -> bool:
    try:
        from sp2ot_engine import SP2OTClustering  # noqa: F401
        from sp2ot_engine.metrics import evaluate  # noqa: F401
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------- browser
# Debian's Chromium, driven by Playwright (which must never download a browser of its own).
CHROMIUM = os.environ.get("SP2OT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"Chromium is not installed at {CHROMIUM} (bash scripts/install_browser.sh installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    return None


def launch_chromium(playwright):
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# ------------------------------------------------------------------------- services
def _pg_admin():
    import psycopg

    url = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


def postgres_available() -> str | None:
    try:
        with _pg_admin() as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as e:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL} ({type(e).__name__}: {e})"


def redis_available() -> str | None:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        return None
    except Exception as e:
        return f"Redis not reachable at {REDIS_URL} ({type(e).__name__}: {e})"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards)."""
    with fresh_database("sp2ot_test") as url:
        yield url


@contextmanager
def fresh_database(prefix: str = "sp2ot_db") -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards): for tests whose reaper or
    hand-made job rows must not meet the jobs of the session's other API instances."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    with fresh_database("sp2ot_fresh") as url:
        yield url


@pytest.fixture(scope="session")
def redis_ns() -> Iterator[dict[str, str]]:
    """A unique key prefix and queue name on the local Redis (keys removed afterwards)."""
    reason = redis_available()
    if reason:
        pytest.skip(reason)
    import redis

    tag = uuid.uuid4().hex[:10]
    ns = {"url": REDIS_URL, "prefix": f"sp2ot-test-{tag}:", "queue": f"sp2ot-test-{tag}"}
    yield ns
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"{ns['prefix']}*", count=1000):
        r.delete(key)
    # kombu keeps a few global bookkeeping keys with the prefix too.
    for key in r.scan_iter(match=f"*{ns['queue']}*", count=1000):
        r.delete(key)


def service_env(*, data_dir: Path, database_url: str = "", redis: dict[str, str] | None = None,
                estimator: str | None = None, **extra: str) -> dict[str, str]:
    """SP2OT_* variables for an API or worker process of the tests."""
    env = {
        "SP2OT_DATA_DIR": str(data_dir),
        "SP2OT_DATABASE_URL": database_url,
        "SP2OT_BROKER_URL": redis["url"] if redis else "",
        "SP2OT_BROKER_KEY_PREFIX": redis["prefix"] if redis else "",
        "SP2OT_QUEUE": redis["queue"] if redis else "sp2ot",
        "SP2OT_BROKER_VISIBILITY_TIMEOUT": "6",
        "SP2OT_BROKER_RESTORE_INTERVAL": "1",
        "SP2OT_HEARTBEAT_INTERVAL": "0.5",
        "SP2OT_HEARTBEAT_TIMEOUT": "3",
        "SP2OT_PROGRESS_INTERVAL": "0.2",
        "SP2OT_CANCEL_CHECK_INTERVAL": "0.2",
        "SP2OT_DEVICE": "cpu",
        "SP2OT_BATCH_SIZE": "16",
        "SP2OT_TORCH_THREADS": "1",  # 2 shared cores: one thread per job avoids oversubscription
    }
    if estimator:
        env["SP2OT_ESTIMATOR"] = estimator
    env.update({k: str(v) for k, v in extra.items()})
    return env


def settings_from(env: dict[str, str]):
    from app.core.config import Settings

    kwargs = {k[len("SP2OT_"):].lower(): v for k, v in env.items() if k.startswith("SP2OT_")}
    return Settings(**kwargs)


def subprocess_env(env: dict[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SP2OT_")}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full["PYTHONUNBUFFERED"] = "1"
    return full


class WorkerProcess:
    """A real Celery worker (``python -m app.cli worker``, solo pool unless told) in its own
    process group."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str, pool: str = "solo"):
        self.env = env
        self.log_path = log_path
        self.name = name
        self.pool = pool
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--pool", self.pool, "--loglevel", "INFO",
             "--hostname", f"{self.name}@%h"],
            cwd=str(REPO), env=subprocess_env(self.env), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if b"ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker dies without acknowledging anything."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


class ServeProcess:
    """``sp2ot serve`` on a free port of 127.0.0.1 in its own process group, with an httpx client."""

    def __init__(self, env, log_path, *args):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), *args],
            cwd=str(REPO), env=subprocess_env(env), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def wait_ready(self, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready:\n{self.log()}")

    def log(self):
        return self.log_path.read_bytes().decode("utf-8", "replace")[-5000:]

    def stop(self, sig=signal.SIGTERM):
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ clients
def create_key(settings, name: str = "tester") -> str:
    from app import crud
    from app.core.db import Database

    db = Database(settings)
    try:
        with db.session() as s:
            _, key = crud.create_api_key(s, name)
            s.commit()
    finally:
        db.dispose()
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload_job(client, key: str | None, archive: bytes, filename: str = "images.zip", truth: bytes | None = None,
               headers: dict[str, str] | None = None, **fields):
    files = {"archive": (filename, archive, "application/octet-stream")}
    if truth is not None:
        files["truth"] = ("truth.csv", truth, "text/csv")
    data = {k: str(v) for k, v in fields.items() if v is not None}
    h = dict(auth(key)) if key else {}
    h.update(headers or {})
    return client.post("/jobs", files=files, data=data, headers=h)


def wait_for(client, key: str, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120,
             predicate: Callable[[dict], bool] | None = None) -> dict:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        r = client.get(f"/jobs/{job_id}", headers=auth(key) if key else {})
        assert r.status_code == 200, r.text
        last = r.json()
        if last["status"] in statuses or (predicate is not None and predicate(last)):
            return last
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {last and last['status']} after {timeout}s: {last}")


@contextmanager
def api_client(settings, client_host: str = "127.0.0.1"):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False, client=(client_host, 40000)) as client:
        yield client


def unit_database(env: dict[str, str]):
    """Settings and a migrated Database for in-process checks (the caller disposes of it)."""
    from app.core.db import Database, run_migrations

    settings = settings_from(env)
    settings.ensure_dirs()
    run_migrations(settings)
    return settings, Database(settings)


@pytest.fixture
def sqlite_db(tmp_path, monkeypatch):
    """Settings + Database on a SQLite file of its own, with the fake estimator in-process."""
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    settings, db = unit_database(service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering"))
    yield settings, db
    db.dispose()


def make_job_row(settings, db, n_images: int = 9, *, owner_id: int | None = None, epochs: int = 1,
                 **columns) -> str:
    """A job on a stored archive of ``n_images`` images, inserted directly (``columns``
    override the defaults: status, attempts, heartbeat_at, ...). Returns its id."""
    from app import crud
    from app.models import Job, new_id
    from app.storage import Storage
    from app.uploads.ingest import check_upload, store_upload

    storage = Storage(settings)
    job_id = new_id()
    archive = settings.tmp_dir / f"{job_id}.zip"
    archive.write_bytes(make_zip(image_set(n_images)))
    checked = check_upload(archive, settings)
    stored = store_upload(checked, storage.job_dir(job_id))
    with db.session() as s:
        if owner_id is None:
            owner_id = crud.create_api_key(s, "unit")[0].id
        s.add(Job(**{"id": job_id, "owner_id": owner_id, "input_path": storage.rel(stored),
                     "n_images": checked.n_images, "n_clusters": 3, "backbone": "efficientnet_lite0",
                     "mode": "fast", "epochs": epochs, "formulation": "sp2ot", "seed": 0, "input_skipped": [],
                     "progress": {}, **columns}))
        s.commit()
    return job_id


def job_state(db, job_id: str):
    """The job's row (a detached ORM object), or None."""
    from app.models import Job

    with db.session() as s:
        return s.get(Job, job_id)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------- celery stack
@pytest.fixture(scope="session")
def engine_path() -> str:
    """The estimator the workers run: the real engine (``SP2OT_TEST_ENGINE=fake`` selects the
    test double, for developing the service alone)."""
    if os.environ.get("SP2OT_TEST_ENGINE") == "fake":
        return "service_fixtures:FakeClustering"
    if not real_engine_available():
        pytest.fail("sp2ot_engine.SP2OTClustering is not importable: the end-to-end tests need the real engine")
    return "sp2ot_engine:SP2OTClustering"


# Completion callbacks of the test services: to receivers on this machine, retried quickly.
CALLBACK_ENV = {"SP2OT_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "SP2OT_CALLBACK_BACKOFF": "0.3",
                "SP2OT_CALLBACK_TIMEOUT": "5"}


@pytest.fixture(scope="session")
def celery_stack(pg_url, redis_ns, tmp_path_factory, engine_path):
    """The API (in-process TestClient, Celery mode) + one real worker subprocess, on the
    session's PostgreSQL database and Redis namespace."""
    data_dir = tmp_path_factory.mktemp("celery-data")
    env = service_env(data_dir=data_dir, database_url=pg_url, redis=redis_ns, estimator=engine_path,
                      SP2OT_AUTH_REQUIRED="true", **CALLBACK_ENV)
    settings = settings_from(env)
    worker = WorkerProcess(env, data_dir / "worker.log", "e2e").start()
    try:
        with api_client(settings) as client:
            worker.wait_ready(120)
            key = create_key(settings, "e2e")
            yield {"client": client, "key": key, "settings": settings, "env": env, "data_dir": data_dir,
                   "db": client.app.state.db, "worker": worker}
    finally:
        worker.stop()


def assignment_rows(db, job_id: str) -> list[tuple]:
    from sqlalchemy import select

    from app.models import Assignment

    with db.session() as s:
        return [tuple(r) for r in s.execute(
            select(Assignment.idx, Assignment.filename, Assignment.cluster, Assignment.confidence)
            .where(Assignment.job_id == job_id).order_by(Assignment.idx))]


def parse_labels_csv(text: str) -> list[dict[str, str]]:
    import csv

    rows = list(csv.DictReader(io.StringIO(text)))
    return rows
