"""End to end: the API (Celery mode) + a real Celery worker process running the real
SP2OTClustering, on the real PostgreSQL and Redis of this machine."""
from __future__ import annotations

import time

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ENGINE_OPTIONS,
    assignment_rows,
    auth,
    image_set,
    make_tar,
    make_zip,
    parse_labels_csv,
    truth_csv,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


def _detail(r, status):
    assert r.status_code == status, r.text
    return r.json()["detail"]


def test_upload_poll_download(celery_stack):
    c, key, db = celery_stack["client"], celery_stack["key"], celery_stack["db"]
    images = image_set(30, folder="shapes/")
    files = dict(images)
    files["shapes/corrupt_1.png"] = images["shapes/img_000_red_circle.png"][:70]  # truncated
    files["shapes/corrupt_2.jpg"] = b"\xff\xd8\xff\xe0" + b"\x00" * 50  # JPEG header only
    files["shapes/readme.txt"] = b"these are shapes"
    r = upload_job(c, key, make_zip(files), "shapes.zip", truth=truth_csv(images), n_clusters=3, **ENGINE_OPTIONS)
    assert r.status_code == 202, r.text
    job = r.json()
    # 31 images by their headers: corrupt_1.png is cut in its pixel data, which only decoding sees
    assert job["status"] == "queued" and job["n_images"] == 31 and job["has_truth"]

    # Poll: the progress moves through the engine's stages.
    stages = set()
    deadline = time.time() + 180
    while time.time() < deadline:
        job = c.get(f"/jobs/{job['id']}", headers=auth(key)).json()
        stages.add(job["progress"].get("stage"))
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    assert job["started_at"] and job["finished_at"] and job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["progress"]["stage"] == "done" and job["progress"]["percent"] == 100
    assert len(stages - {None}) >= 2, stages
    summary = job["summary"]
    assert summary["n_images"] == 30 and sum(summary["cluster_sizes"]) == 30 and len(summary["cluster_sizes"]) == 3
    skipped = {s["name"]: s["reason"] for s in summary["skipped"]}
    assert {"shapes/corrupt_1.png", "shapes/corrupt_2.jpg", "shapes/readme.txt"} <= set(skipped), skipped
    assert summary["n_skipped"] == len(summary["skipped"])
    if "Fake" not in celery_stack["env"].get("SP2OT_ESTIMATOR", ""):  # the real engine says where its head started
        assert summary["start"] in ("density", "spectral", "kmeans") and isinstance(summary["start_notes"], list)

    # Labels: one row per image, names exactly the archive's image names.
    r = c.get(f"/jobs/{job['id']}/labels.csv", headers=auth(key))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.startswith("filename,cluster,confidence,outlier_score,outlier,duplicate_of\r\n")
    rows = parse_labels_csv(r.text)
    assert sorted(row["filename"] for row in rows) == sorted(images)
    assert all(0 <= int(row["cluster"]) < 3 and 0.0 <= float(row["confidence"]) <= 1.0 for row in rows)
    sizes = [0, 0, 0]
    for row in rows:
        sizes[int(row["cluster"])] += 1
    assert sizes == summary["cluster_sizes"]
    assert len(assignment_rows(db, job["id"])) == 30

    # Metrics: sizes, curves, and the paper's metrics from the truth CSV.
    m = c.get(f"/jobs/{job['id']}/metrics", headers=auth(key)).json()
    assert m["cluster_sizes"] == summary["cluster_sizes"] and m["cluster_size_distribution"]["max"] >= 10
    assert m["history"] and len(m["curves"]["loss"]) == len(m["history"])
    assert m["truth"] == {"n_labelled": 30, "n_classes": 3}
    for name in ("acc", "nmi", "f1", "ari", "head_acc", "medium_acc", "tail_acc"):
        assert 0.0 <= m["evaluation"][name] <= 1.0, m["evaluation"]

    # Finished jobs cannot be cancelled; listing and filters see it; delete removes everything.
    assert "already succeeded" in _detail(c.post(f"/jobs/{job['id']}/cancel", headers=auth(key)), 409)
    listed = c.get("/jobs", params={"status": "succeeded"}, headers=auth(key)).json()
    assert job["id"] in [j["id"] for j in listed["items"]]
    assert c.delete(f"/jobs/{job['id']}", headers=auth(key)).status_code == 204
    assert assignment_rows(db, job["id"]) == []
    assert not (celery_stack["data_dir"] / "jobs" / job["id"]).exists()


def test_a_job_without_k_runs_the_engine_choice_and_records_it(celery_stack):
    """The real engine behind the worker: K chosen in k_min..k_max, written back as the job's K,
    the curve in the summary, an exact copy flagged in labels.csv."""
    c, key = celery_stack["client"], celery_stack["key"]
    images = image_set(24)
    images["zz_copy.png"] = images["img_000_red_circle.png"]
    r = upload_job(c, key, make_zip(images), "auto.zip", k_min=2, k_max=4, **ENGINE_OPTIONS)
    assert r.status_code == 202, r.text
    job = wait_for(c, key, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    choice = job["summary"]["k_choice"]
    assert [k for k, _ in choice["curve"]] == [2, 3, 4] and choice["chosen"] in (2, 3, 4)
    assert job["options"]["n_clusters"] == choice["chosen"] == len(job["summary"]["cluster_sizes"])
    rows = {row["filename"]: row for row in parse_labels_csv(c.get(f"/jobs/{job['id']}/labels.csv",
                                                                    headers=auth(key)).text)}
    if "Fake" not in celery_stack["env"].get("SP2OT_ESTIMATOR", ""):
        assert choice["criterion"] == "modularity"
    assert rows["zz_copy.png"]["duplicate_of"] == "img_000_red_circle.png"


def test_dataset_then_jobs_from_json(celery_stack):
    c, key = celery_stack["client"], celery_stack["key"]
    images = image_set(21, prefix="shape")
    r = c.post("/datasets", files={"archive": ("shapes.tar.gz", make_tar(images), "application/gzip")},
               headers=auth(key))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["n_images"] == 21 and ds["skipped"] == []
    r = c.post("/jobs", json={"dataset_id": ds["id"], "n_clusters": 3, **ENGINE_OPTIONS, "seed": 1},
               headers={**auth(key), "Idempotency-Key": "ds-job-1"})
    assert r.status_code == 202, r.text
    job = wait_for(c, key, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    assert job["options"]["seed"] == 1 and job["dataset_id"] == ds["id"]
    # A retried POST returns the same job.
    again = c.post("/jobs", json={"dataset_id": ds["id"], "n_clusters": 3}, headers={**auth(key), "Idempotency-Key": "ds-job-1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"] and again.json()["status"] == "succeeded"
    rows = parse_labels_csv(c.get(f"/jobs/{job['id']}/labels.csv", headers=auth(key)).text)
    assert sorted(r["filename"] for r in rows) == sorted(images)
    # Deleting the dataset keeps the finished job's results.
    assert c.get("/jobs", params={"dataset_id": ds["id"]}, headers=auth(key)).json()["total"] == 1
    assert c.delete(f"/datasets/{ds['id']}", headers=auth(key)).status_code == 204
    assert c.get(f"/jobs/{job['id']}", headers=auth(key)).json()["dataset_id"] is None
    assert len(parse_labels_csv(c.get(f"/jobs/{job['id']}/labels.csv", headers=auth(key)).text)) == 21


def test_cancel_a_running_job(celery_stack):
    c, key, db = celery_stack["client"], celery_stack["key"], celery_stack["db"]
    r = upload_job(c, key, make_zip(image_set(24)), n_clusters=3, **{**ENGINE_OPTIONS, "epochs": 500})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    job = wait_for(c, key, jid, timeout=120, predicate=lambda j: j["progress"].get("stage") == "training")
    assert job["status"] == "running", job
    t0 = time.time()
    r = c.post(f"/jobs/{jid}/cancel", headers=auth(key))
    assert r.status_code == 200 and r.json()["cancel_requested"]
    job = wait_for(c, key, jid, timeout=60)
    assert job["status"] == "cancelled", job
    assert time.time() - t0 < 30
    assert job["finished_at"] and job["summary"] is None
    assert "cancelled" in _detail(c.get(f"/jobs/{jid}/labels.csv", headers=auth(key)), 409)
    assert assignment_rows(db, jid) == []
    # The worker is free again: a health check sees it.
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["workers"]["count"] >= 1, health


def test_job_failing_in_the_engine_reports_the_reason(celery_stack):
    c, key = celery_stack["client"], celery_stack["key"]
    r = upload_job(c, key, make_zip(image_set(6)), n_clusters=2, backbone="no_such_backbone", epochs=1)
    if r.status_code == 422:  # refused before queuing: even better
        assert "backbone" in r.json()["detail"]
        return
    assert r.status_code == 202, r.text
    job = wait_for(c, key, r.json()["id"], timeout=120)
    assert job["status"] == "failed" and "backbone" in job["error"].lower(), job
    assert "failed" in _detail(c.get(f"/jobs/{job['id']}/labels.csv", headers=auth(key)), 409)


def test_delete_a_running_job(celery_stack):
    """Deleting a running job removes its rows and files at once; its worker notices within
    a second that the job is gone and stops without writing anything."""
    c, key, db = celery_stack["client"], celery_stack["key"], celery_stack["db"]
    r = upload_job(c, key, make_zip(image_set(24)), n_clusters=3, **{**ENGINE_OPTIONS, "epochs": 500})
    jid = r.json()["id"]
    wait_for(c, key, jid, timeout=120, predicate=lambda j: j["progress"].get("stage") == "training")
    assert c.delete(f"/jobs/{jid}", headers=auth(key)).status_code == 204
    assert c.get(f"/jobs/{jid}", headers=auth(key)).status_code == 404
    assert not (celery_stack["data_dir"] / "jobs" / jid).exists()
    deadline = time.time() + 60
    while time.time() < deadline and f"job {jid}: attempt 1 superseded or deleted" not in celery_stack["worker"].log():
        time.sleep(0.2)
    assert f"job {jid}: attempt 1 superseded or deleted" in celery_stack["worker"].log()
    assert assignment_rows(db, jid) == []
