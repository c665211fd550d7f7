"""sp2ot.client against the real service (the API in Celery mode, a real worker running the
real engine, PostgreSQL, Redis): submit a folder, wait with a progress bar, labels as a
DataFrame or rows, exports, assign new images; the service's errors as exceptions."""
from __future__ import annotations

import hashlib
import hmac
import zipfile

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ENGINE_OPTIONS, image_set, make_zip, truth_csv  # noqa: E402

from sp2ot.client import Client, JobFailed, ServiceError, verify_signature  # noqa: E402

pytest_plugins = ["service_fixtures"]


def _folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_submit_wait_labels_export_assign(celery_stack, tmp_path, capsys):
    client = Client(api_key=celery_stack["key"], http=celery_stack["client"])
    images = image_set(24, folder="shapes/")
    folder = _folder(tmp_path / "images", images)
    (tmp_path / "truth.csv").write_bytes(truth_csv(images))
    job = client.submit(folder, k=3, truth=tmp_path / "truth.csv", **ENGINE_OPTIONS)
    assert job.status == "queued" and job.info["n_images"] == 24 and job.info["has_truth"]
    capsys.readouterr()
    info = job.wait(timeout=180)
    assert info["status"] == "succeeded" and "100%" in capsys.readouterr().err  # the progress bar

    frame = job.labels()  # pandas is installed (dev extra): a DataFrame
    assert list(frame.columns) == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    assert len(frame) == 24
    rows = job.labels(as_frame=False)
    assert sorted(r["filename"] for r in rows) == sorted(images) and all(isinstance(r["cluster"], int) for r in rows)
    assert frame["cluster"].tolist() == [r["cluster"] for r in rows]
    assert all(isinstance(r["outlier"], bool) and isinstance(r["outlier_score"], float) for r in rows)
    assert job.metrics()["evaluation"]["acc"] == pytest.approx(1.0)

    exported = job.export("json")
    assert isinstance(exported, dict) and exported
    assert job.export("csv").startswith("filename,cluster,confidence")
    with zipfile.ZipFile(job.export("zip", to=tmp_path / "c.zip")) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".png")]) == 24
    with pytest.raises(ValueError, match="format must be one of"):
        job.export("xml")

    new = image_set(6, prefix="new")
    assigned = job.assign(_folder(tmp_path / "new", new), as_frame=False, progress=False)
    cluster_of = {r["filename"].rsplit("_", 1)[-1]: r["cluster"] for r in rows}
    assert {r["filename"]: r["cluster"] for r in assigned} == {n: cluster_of[n.rsplit("_", 1)[-1]] for n in new}
    again = job.assign(_zip_file(tmp_path, new), progress=False)
    assert sorted(again["filename"]) == sorted(new)  # an archive is sent as it is; a DataFrame back
    assert client.job(job.id).status == "succeeded" and job.id in [j.id for j in client.jobs()]


def _zip_file(tmp_path, files):
    path = tmp_path / "new.zip"
    path.write_bytes(make_zip(files))
    return path


def test_errors_are_exceptions_with_the_service_message(celery_stack, tmp_path):
    client = Client(api_key=celery_stack["key"], http=celery_stack["client"])
    archive = _zip_file(tmp_path, image_set(6))
    with pytest.raises(ServiceError) as e:
        client.submit(archive, k=1)
    assert e.value.status == 422 and "n_clusters" in e.value.detail
    with pytest.raises(ServiceError) as e:
        Client(api_key="sp2ot_wrong", http=celery_stack["client"]).jobs()
    assert e.value.status == 401 and "Invalid or revoked API key" in e.value.detail
    with pytest.raises(FileNotFoundError):
        client.submit(tmp_path / "missing", k=3)

    job = client.submit(archive, k=3, **ENGINE_OPTIONS)
    job.cancel()
    with pytest.raises(JobFailed, match="cancelled"):
        job.wait(timeout=120, progress=False)
    with pytest.raises(ServiceError) as e:
        job.assign(archive)
    assert e.value.status == 409


def test_verify_signature():
    body, secret = b'{"id": "x"}', "s3cret"
    header = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert verify_signature(body, header, secret)
    assert not verify_signature(body + b" ", header, secret) and not verify_signature(body, None, secret)
    assert not verify_signature(body, header, "other")
