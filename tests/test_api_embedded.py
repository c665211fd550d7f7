"""The embedded mode: ``sp2ot serve`` with SQLite, files under the data dir and in-process
worker threads (no PostgreSQL, Redis or Celery needed), and the ``sp2ot`` admin commands."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import httpx
import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ENGINE_OPTIONS,
    REPO,
    ServeProcess,
    api_client,
    auth,
    free_port,
    image_set,
    make_zip,
    parse_labels_csv,
    service_env,
    settings_from,
    subprocess_env,
    truth_csv,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


def test_sp2ot_serve_embedded(tmp_path, engine_path):
    data_dir = tmp_path / "data"
    env = service_env(data_dir=data_dir, estimator=engine_path)
    server = ServeProcess(env, tmp_path / "serve.log").wait_ready()
    try:
        c = server.client
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["workers"]["mode"] == "in-process", health
        assert health["database"]["detail"] == "sqlite"
        images = image_set(24)
        r = upload_job(c, None, make_zip(images), truth=truth_csv(images), n_clusters=3, **ENGINE_OPTIONS)
        assert r.status_code == 202, r.text
        job = wait_for(c, None, r.json()["id"], timeout=180)
        assert job["status"] == "succeeded", (job, server.log())
        rows = parse_labels_csv(c.get(f"/jobs/{job['id']}/labels.csv").text)
        assert sorted(r["filename"] for r in rows) == sorted(images)
        assert c.get(f"/jobs/{job['id']}/metrics").json()["evaluation"]["acc"] >= 0
        assert (data_dir / "sp2ot.db").is_file()

        # A long job, then the server dies (SIGKILL): the restarted server resumes the job.
        r = upload_job(c, None, make_zip(images), n_clusters=3, **{**ENGINE_OPTIONS, "epochs": 500})
        slow = r.json()["id"]
        wait_for(c, None, slow, timeout=120, predicate=lambda j: j["progress"].get("stage") == "training")
    finally:
        server.stop(signal.SIGKILL)
    server = ServeProcess(env, tmp_path / "serve2.log").wait_ready()
    try:
        c = server.client
        job = wait_for(c, None, slow, timeout=120,
                       predicate=lambda j: j["attempts"] == 2 and j["progress"].get("stage") == "training")
        assert job["status"] == "running"
        assert c.post(f"/jobs/{slow}/cancel").json()["cancel_requested"]
        assert wait_for(c, None, slow, timeout=60)["status"] == "cancelled"
    finally:
        server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log()  # uvicorn re-raises the signal
    assert "Application shutdown complete" in server.log()


def test_serve_refuses_a_public_address_without_auth(tmp_path):
    env = service_env(data_dir=tmp_path)
    p = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       cwd=str(REPO), env=subprocess_env(env), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "Refusing to listen on 0.0.0.0 without authentication" in p.stderr
    assert "SP2OT_AUTH_REQUIRED=true" in p.stderr


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=str(REPO), env=subprocess_env(env),
                          capture_output=True, text=True, timeout=60)


def test_api_key_commands_and_auth(tmp_path):
    env = service_env(data_dir=tmp_path, SP2OT_AUTH_REQUIRED="true")
    p = _cli(env, "create-api-key", "alice")
    assert p.returncode == 0, p.stderr
    key = p.stdout.strip()
    assert key.startswith("sp2ot_") and len(key) > 40 and "shown only once" in p.stderr
    assert key not in (tmp_path / "sp2ot.db").read_bytes().decode("latin-1")  # only its hash is stored
    listing = _cli(env, "list-api-keys")
    assert "alice" in listing.stdout and key not in listing.stdout
    with api_client(settings_from(env)) as c:
        assert c.get("/jobs").status_code == 401
        assert c.get("/jobs", headers=auth(key)).json()["total"] == 0
    assert _cli(env, "revoke-api-key", "alice").returncode == 0
    with api_client(settings_from(env)) as c:
        assert c.get("/jobs", headers=auth(key)).status_code == 401


def test_no_auth_mode_answers_local_clients_only(tmp_path):
    settings = settings_from(service_env(data_dir=tmp_path))
    with api_client(settings, client_host="203.0.113.9") as c:
        r = c.get("/jobs")
        assert r.status_code == 401 and "only answers requests from its own machine" in r.json()["detail"]
    with api_client(settings) as c:
        assert c.get("/jobs").status_code == 200


def test_worker_command_needs_a_broker(tmp_path):
    p = _cli(service_env(data_dir=tmp_path), "worker")
    assert p.returncode == 2 and "SP2OT_BROKER_URL" in p.stderr


def test_other_commands_go_to_the_engine_cli(monkeypatch):
    from app import cli

    seen = {}
    fake = types.ModuleType("sp2ot_engine.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "sp2ot_engine.cli", fake)
    assert cli.main(["cluster", "images.zip", "--k", "5"]) == 0
    assert seen["argv"] == ["cluster", "images.zip", "--k", "5"]
