"""The OpenAPI document is the contract: a bounded schemathesis run with every check
(``--checks all``: no 5xx, status codes, bodies and headers as documented, invalid input
refused, ``Allow`` on 405, ...) against ``sp2ot serve`` in the embedded mode (SQLite, a data
dir of its own) with API keys required, must find nothing.

Fixed seed, 25 examples per operation, one worker: the run is reproducible and takes well
under two minutes. Configuration (why a schema-valid upload may still be a 422, and a
succeeded job for the job operations) in ``tests/schemathesis.toml``. Reproduce by hand::

    schemathesis --config-file tests/schemathesis.toml run http://127.0.0.1:8000/openapi.json \\
        --checks all --seed 1 -n 25 --workers 1 -H "Authorization: Bearer <key>"
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    TESTS,
    ServeProcess,
    auth,
    create_key,
    image_set,
    make_zip,
    service_env,
    unit_database,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]
pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install -e '.[dev]')")

SEED = 1
EXAMPLES = 25
RUN = "from schemathesis.cli import schemathesis; schemathesis()"


def test_openapi_contract_holds_under_fuzzing(tmp_path):
    env = service_env(data_dir=tmp_path / "data", estimator="service_fixtures:FakeClustering",
                      SP2OT_AUTH_REQUIRED="true", SP2OT_FAKE_STEP_DELAY="0.001")
    settings, db = unit_database(env)
    db.dispose()
    key = create_key(settings, "contract")
    server = ServeProcess(env, tmp_path / "serve.log").wait_ready()
    try:
        r = upload_job(server.client, key, make_zip(image_set(9)), n_clusters=3, epochs=1)
        assert r.status_code == 202, r.text
        job = wait_for(server.client, key, r.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        run = subprocess.run(
            [sys.executable, "-c", RUN, "--config-file", str(TESTS / "schemathesis.toml"), "run",
             f"http://127.0.0.1:{server.port}/openapi.json", "--checks", "all", "--seed", str(SEED),
             "--max-examples", str(EXAMPLES), "--workers", "1", "--no-color",
             "-H", f"Authorization: {auth(key)['Authorization']}"],
            cwd=str(tmp_path), env={**os.environ, "SP2OT_CONTRACT_JOB_ID": job["id"]},
            capture_output=True, text=True, timeout=300,
        )
        report = run.stdout[-8000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        assert " passed" in report and "failures" not in report.split("Test cases:")[-1], report
        assert "Internal server error" not in server.log(), server.log()
    finally:
        server.stop()
