"""Shared helpers of the API benchmarks: a server (and worker) on 127.0.0.1 only, a
throw-away PostgreSQL database / Redis namespace, process RSS."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from service_fixtures import (  # noqa: E402
    PG_ADMIN_URL,
    REDIS_URL,
    WorkerProcess,
    _pg_admin,
    free_port,
    postgres_available,
    redis_available,
    service_env,
    subprocess_env,
)

import httpx  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"refusing to benchmark {url}: only servers on this machine (127.0.0.1) are allowed")


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``/proc/<pid>/status`` in bytes: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Samples a process's RSS every ``period`` seconds until :meth:`stop` (which returns the peak)."""

    def __init__(self, pid: int, period: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            time.sleep(self.period)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Server:
    """``sp2ot serve`` on 127.0.0.1 in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"],
            cwd=str(REPO), env=subprocess_env(env), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health/live", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextmanager
def stack(mode: str, estimator: str, *, with_worker: bool = True, **extra: str):
    """Yields (server, env, workdir). mode: "celery" (PostgreSQL + Redis + a worker process,
    none with ``with_worker=False``: jobs stay queued) or "embedded" (SQLite + in-process worker)."""
    workdir = Path(tempfile.mkdtemp(prefix="sp2ot-bench-"))
    dbname = None
    ns = None
    worker = None
    server = None
    try:
        if mode == "celery":
            for reason in (postgres_available(), redis_available()):
                if reason:
                    raise SystemExit(f"celery mode needs PostgreSQL and Redis: {reason} (use --mode embedded)")
            dbname = f"sp2ot_bench_{uuid.uuid4().hex[:10]}"
            with _pg_admin() as conn:
                conn.execute(f'CREATE DATABASE "{dbname}"')
            tag = uuid.uuid4().hex[:8]
            ns = {"url": REDIS_URL, "prefix": f"sp2ot-bench-{tag}:", "queue": f"sp2ot-bench-{tag}"}
            env = service_env(data_dir=workdir / "data", database_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{dbname}",
                              redis=ns, estimator=estimator, SP2OT_PROGRESS_INTERVAL="0.5",
                              SP2OT_CANCEL_CHECK_INTERVAL="0.5", SP2OT_HEARTBEAT_INTERVAL="5",
                              SP2OT_HEARTBEAT_TIMEOUT="60", SP2OT_BROKER_VISIBILITY_TIMEOUT="3600", **extra)
            worker = WorkerProcess(env, workdir / "worker.log", "bench").start() if with_worker else None
        else:
            env = service_env(data_dir=workdir / "data", estimator=estimator, SP2OT_PROGRESS_INTERVAL="0.5",
                              SP2OT_CANCEL_CHECK_INTERVAL="0.5", **extra)
        server = Server(env, workdir / "server.log").wait_ready()
        if worker is not None:
            worker.wait_ready(120)
        yield server, env, workdir
    finally:
        if server is not None:
            server.stop()
        if worker is not None:
            worker.stop()
        if ns:
            import redis

            r = redis.Redis.from_url(REDIS_URL)
            for key in r.scan_iter(match=f"{ns['prefix']}*", count=1000):
                r.delete(key)
        if dbname:
            with _pg_admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
