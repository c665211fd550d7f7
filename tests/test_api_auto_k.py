"""A job that leaves K to the worker (k_min/k_max), the chosen K and its curve in the job, the
metrics and the result view; the image flags in labels.csv and the JSON export; the 422s of a bad
range. On PostgreSQL (the result rows go in by COPY) with the fake estimator, which "chooses"
k_min and flags the last image as an outlier and every "copy" image as a duplicate of the first."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    api_client,
    image_set,
    make_zip,
    parse_labels_csv,
    service_env,
    settings_from,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


@pytest.fixture(scope="module")
def client(pg_url, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    data_dir = tmp_path_factory.mktemp("auto-k-data")
    settings = settings_from(service_env(data_dir=data_dir, database_url=pg_url,
                                         estimator="service_fixtures:FakeClustering"))
    with api_client(settings) as c:
        yield c
    mp.undo()


def _images() -> dict[str, bytes]:
    images = image_set(12)
    first = sorted(images)[0]
    images["zz_copy_of_first.png"] = images[first]
    return images


def test_a_job_without_k_reports_the_chosen_k_its_curve_and_the_flags(client):
    r = upload_job(client, None, make_zip(_images()), "auto.zip", k_min=3, k_max=5, epochs=1)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["options"]["n_clusters"] is None
    assert (queued["options"]["k_min"], queued["options"]["k_max"]) == (3, 5)
    job = wait_for(client, None, queued["id"], timeout=60)
    assert job["status"] == "succeeded", job
    assert job["options"]["n_clusters"] == 3 == job["summary"]["n_clusters"]  # the worker's choice, recorded
    choice = job["summary"]["k_choice"]
    assert choice["chosen"] == 3 and (choice["k_min"], choice["k_max"]) == (3, 5)
    assert [k for k, _ in choice["curve"]] == [3, 4, 5] and choice["curve"][0][1] == max(v for _, v in choice["curve"])
    assert client.get(f"/jobs/{job['id']}/metrics").json()["k_choice"] == choice

    rows = parse_labels_csv(client.get(f"/jobs/{job['id']}/labels.csv").text)
    assert list(rows[0]) == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    by_name = {row["filename"]: row for row in rows}
    first = rows[0]["filename"]
    assert by_name["zz_copy_of_first.png"]["duplicate_of"] == first
    assert [row["outlier"] for row in rows].count("true") == 1 and rows[-1]["outlier"] == "true"
    assert job["summary"]["n_outliers"] == 1 and job["summary"]["n_duplicates"] == 1

    data = client.get(f"/jobs/{job['id']}/export?format=json").json()
    assert data["k_choice"] == choice
    assert data["images"][-1]["duplicate_of"] == first and data["images"][-1]["outlier"] is True

    html = client.get(f"/ui/jobs/{job['id']}").text
    assert "Number of clusters" in html and "<polyline" in html and "(chosen in 3–5)" in html
    assert "1 outlier" in html and "1 duplicate " in html


def test_a_job_without_k_or_range_gets_the_default_range(client):
    r = upload_job(client, None, make_zip(image_set(45)), "default.zip", epochs=1)
    assert r.status_code == 202, r.text
    assert (r.json()["options"]["k_min"], r.json()["options"]["k_max"]) == (2, 2)  # 45 // 20 = 2
    client.post(f"/jobs/{r.json()['id']}/cancel")


@pytest.mark.parametrize("fields, message", [
    ({"k_min": 6, "k_max": 4}, "k_min=6 is larger than k_max=4"),
    ({"k_max": 13}, "k_max=13 is larger than the number of images (12)"),
    ({"k_min": 13}, "k_min=13 is larger than the number of images (12)"),
    ({"n_clusters": 3, "k_max": 5}, "either n_clusters or k_min/k_max"),
    ({"k_min": 1}, "k_min"),
])
def test_a_bad_range_is_a_422_that_says_what_to_fix_and_leaves_nothing(client, fields, message):
    before = client.get("/jobs").json()["total"]
    r = upload_job(client, None, make_zip(image_set(12)), "bad.zip", **fields)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert client.get("/jobs").json()["total"] == before
    jobs_dir = client.app.state.settings.data_dir / "jobs"
    folders = {p.name for p in jobs_dir.iterdir()} if jobs_dir.exists() else set()
    assert folders <= {j["id"] for j in client.get("/jobs?limit=100").json()["items"]}  # no folder of the rejected one
