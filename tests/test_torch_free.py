"""The modules an API process uses (archive checks and manifest, the CSV formats, the vocabulary)
load and run without torch, and an API process in production mode never imports it: the API
must not pay torch's start-up time and memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.register_assert_rewrite("service_fixtures")
pytest_plugins = ["service_fixtures"]

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import io, sys, zipfile
    from pathlib import Path

    import sp2ot_engine.io.archive as archive
    import sp2ot_engine.io.collection as collection
    import sp2ot_engine.io.labels_csv as labels_csv
    import sp2ot_engine.options as options
    from PIL import Image

    tmp = Path(sys.argv[1])
    buf = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buf, "PNG")
    with zipfile.ZipFile(tmp / "a.zip", "w") as z:
        z.writestr("a.png", buf.getvalue())
        z.writestr("notes.txt", "hello")
    manifest = archive.inspect_archive(tmp / "a.zip", archive.Limits(max_members=10))
    manifest.write(archive.manifest_path(tmp / "a.zip"))
    assert archive.Manifest.read(archive.manifest_path(tmp / "a.zip")) == manifest
    assert manifest.total_pixels == 15 and len(manifest.skipped) == 1
    labels_csv.write_labels(tmp / "labels.csv", [("a.png", 0, 0.5)])
    assert labels_csv.read_labels(tmp / "labels.csv") == {"a.png": "0"}
    assert options.Mode("fast") == "fast" and "sp2ot" in options.FORMULATIONS
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "timm")))
    print(loaded)
    assert not loaded, loaded
""")


def test_api_side_modules_do_not_import_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "[]"


API_SCRIPT = textwrap.dedent("""
    import io, sys, tarfile, zipfile

    from fastapi.testclient import TestClient
    from PIL import Image

    from app.core.config import Settings
    from app.main import create_app

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, "PNG")
        return buf.getvalue()

    images = {f"img_{i}.png": png((60 * i % 255, 20, 200)) for i in range(6)}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        for name, data in images.items():
            z.writestr(name, data)
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    truth = "".join(f"{name},{i % 2}\\n" for i, name in enumerate(images)).encode()

    settings = Settings()
    assert not settings.embedded, "the production dispatcher (Celery) is what this checks"
    with TestClient(create_app(settings), client=("127.0.0.1", 40000)) as c:
        r = c.post("/datasets", files={"archive": ("a.zip", zipped.getvalue())})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        r = c.post("/jobs", files={"archive": ("a.tgz", tgz.getvalue()), "truth": ("t.csv", truth)},
                   data={"n_clusters": "2"})
        assert r.status_code == 202 and r.json()["n_images"] == 6, r.text
        job = r.json()["id"]
        r = c.post("/jobs", data={"dataset_id": ds, "n_clusters": "2"}, files={"truth": ("t.csv", truth)})
        assert r.status_code == 202, r.text
        assert c.post("/jobs", files={"archive": ("x.zip", b"not an archive")}, data={"n_clusters": "2"}
                      ).status_code == 422
        assert c.get(f"/jobs/{job}").json()["status"] == "queued"
        assert c.get(f"/jobs/{job}/labels.csv").status_code == 409
        assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.get("/").status_code == 200 and 'name="init"' in c.get("/").text

        # The pages and exports of a succeeded job read the originals through the stored upload's
        # manifest, without torch (the job is marked succeeded here: no worker runs in this test).
        from app.jobs.repository import bulk_insert_assignments
        from app.models import Job, JobStatus

        names = sorted(images)
        with c.app.state.db.begin() as s:
            bulk_insert_assignments(s, job, names, [i % 2 for i in range(len(names))], [0.5] * len(names))
            row = s.get(Job, job)
            row.status = JobStatus.SUCCEEDED
            row.summary = {"n_images": 6, "n_clusters": 2, "cluster_sizes": [3, 3], "n_skipped": 0, "skipped": []}
        for page in ("", "/clusters/0", "/metrics", "/images/0"):
            assert c.get(f"/ui/jobs/{job}{page}").status_code == 200, page
        r = c.get(f"/ui/jobs/{job}/original/1")
        assert r.status_code == 200 and r.content == images[names[1]] and r.headers["content-type"] == "image/png"
        r = c.get(f"/jobs/{job}/export?format=zip")
        assert zipfile.ZipFile(io.BytesIO(r.content)).read(f"cluster_0/{names[0]}") == images[names[0]]
        assert c.get(f"/jobs/{job}/labels.csv").text.startswith(
            "filename,cluster,confidence,outlier_score,outlier,duplicate_of\\r\\n")
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "timm")))
    print(loaded)
""")


def test_the_api_process_never_loads_torch(tmp_path, fresh_pg, redis_ns):
    """An API process in production mode (PostgreSQL, the Celery queue on Redis; no worker
    consumes it) creates its app, validates and stores uploads (zip, tar.gz, truth CSVs, a bad
    upload), serves the job and health endpoints: torch is never imported."""
    from service_fixtures import service_env, subprocess_env

    env = service_env(data_dir=tmp_path / "data", database_url=fresh_pg,
                      redis={**redis_ns, "queue": redis_ns["queue"] + "-torchfree"})
    r = subprocess.run([sys.executable, "-c", API_SCRIPT], capture_output=True, text=True, env=subprocess_env(env),
                       cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
    # the check sees torch when it is there: the same script with torch imported first
    r = subprocess.run([sys.executable, "-c", "import torch\n" + API_SCRIPT], capture_output=True, text=True,
                       env=subprocess_env(env), cwd=tmp_path, timeout=180)
    assert r.returncode == 0 and "'torch'" in r.stdout.strip().splitlines()[-1], r.stdout + r.stderr
