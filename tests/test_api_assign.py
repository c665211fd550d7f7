"""POST /jobs/{id}/assign end to end: the API (Celery mode) + a real Celery worker running the
real engine on PostgreSQL and Redis: new images go into the clusters of a finished job by its
saved model, without training; bad requests are refused without leftovers."""
from __future__ import annotations

import time
from collections import Counter

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ENGINE_OPTIONS,
    auth,
    files_under,
    image_set,
    make_zip,
    parse_labels_csv,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


def _kind(name: str) -> str:
    return name.rsplit("_", 1)[-1][:-4]  # ..._red_circle.png -> circle


def post_assign(client, key: str, job_id: str, archive: bytes, filename: str = "new.zip"):
    return client.post(f"/jobs/{job_id}/assign", files={"archive": (filename, archive, "application/zip")},
                       headers=auth(key))


def wait_assign(client, key: str, url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(url, headers=auth(key))
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("succeeded", "failed"):
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"assign request {url} not final after {timeout}s: {r.json()}")


@pytest.fixture(scope="module")
def finished_job(celery_stack):
    c, key = celery_stack["client"], celery_stack["key"]
    r = upload_job(c, key, make_zip(image_set(24)), n_clusters=3, **ENGINE_OPTIONS)
    assert r.status_code == 202, r.text
    job = wait_for(c, key, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_assign_new_images_to_a_finished_job(celery_stack, finished_job):
    c, key, data_dir = celery_stack["client"], celery_stack["key"], celery_stack["data_dir"]
    job_id = finished_job["id"]
    labels = parse_labels_csv(c.get(f"/jobs/{job_id}/labels.csv", headers=auth(key)).text)
    cluster_of_kind = {}
    for kind in ("circle", "square", "triangle"):
        clusters = Counter(int(r["cluster"]) for r in labels if _kind(r["filename"]) == kind)
        cluster_of_kind[kind] = clusters.most_common(1)[0][0]

    new = image_set(9, prefix="new")  # other jitter seeds than the job's images
    files = {**new, "notes.txt": b"not an image", "cut.png": new["new_000_red_circle.png"][:70]}
    r = post_assign(c, key, job_id, make_zip(files))
    assert r.status_code == 202, r.text
    req = r.json()
    assert req["status"] == "queued" and req["job_id"] == job_id and req["n_images"] == 10
    assert r.headers["location"] == req["links"]["self"] == f"/jobs/{job_id}/assignments/{req['id']}"

    done = wait_assign(c, key, req["links"]["self"])
    assert done["status"] == "succeeded", done
    summary = done["summary"]
    assert summary["n_assigned"] == 9 and sum(summary["cluster_counts"]) == 9 and len(summary["cluster_counts"]) == 3
    assert {s["name"] for s in summary["skipped"]} == {"notes.txt", "cut.png"}

    r = c.get(done["links"]["labels"], headers=auth(key))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.startswith("filename,cluster,confidence,outlier_score,outlier\r\n")
    rows = parse_labels_csv(r.text)
    assert sorted(row["filename"] for row in rows) == sorted(new)
    # each new image lands in the cluster of its kind, as the model clustered the job's images
    assert {row["filename"]: int(row["cluster"]) for row in rows} == {n: cluster_of_kind[_kind(n)] for n in new}
    assert all(0.0 < float(row["confidence"]) <= 1.0 for row in rows)
    # without training: the job's own results are as they were
    assert c.get(f"/jobs/{job_id}", headers=auth(key)).json()["finished_at"] == finished_job["finished_at"]
    # the upload is gone once assigned; the model and the CSV stay with the job
    left = files_under(data_dir / "jobs" / job_id)
    assert "model.pt" in left and f"assign/{req['id']}/labels.csv" in left
    assert not [f for f in left if f.startswith(f"assign/{req['id']}/upload")], left


def test_assign_refusals(celery_stack, finished_job):
    c, key, data_dir = celery_stack["client"], celery_stack["key"], celery_stack["data_dir"]
    job_id = finished_job["id"]
    before = files_under(data_dir / "jobs" / job_id)

    r = post_assign(c, key, job_id, b"this is not an archive", "new.zip")
    assert r.status_code == 422 and "not an archive" in r.json()["detail"]
    r = c.post(f"/jobs/{job_id}/assign", files={"images": ("new.zip", make_zip(image_set(3)))}, headers=auth(key))
    assert r.status_code == 422, r.text
    r = post_assign(c, key, "0" * 32, make_zip(image_set(3)))
    assert r.status_code == 404
    r = c.get(f"/jobs/{job_id}/assignments/{'0' * 32}", headers=auth(key))
    assert r.status_code == 404
    assert files_under(data_dir / "jobs" / job_id) == before  # nothing left behind

    # a job that has not succeeded has no model to assign with: 409
    r = upload_job(c, key, make_zip(image_set(24)), n_clusters=3, **ENGINE_OPTIONS)
    cancelled = c.post(f"/jobs/{r.json()['id']}/cancel", headers=auth(key)).json()
    cancelled = wait_for(c, key, cancelled["id"])
    assert cancelled["status"] == "cancelled"
    r = post_assign(c, key, cancelled["id"], make_zip(image_set(3)))
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert not (data_dir / "jobs" / cancelled["id"] / "assign").exists()
