"""Upload validation, access control and idempotency of the API, on the real PostgreSQL and
Redis of this machine. No worker runs here: accepted jobs just stay queued.

Every rejection must be a JSON ``{"detail": "..."}`` saying what to fix, and leave no row
and no file behind."""
from __future__ import annotations

import io
import zipfile

import pytest
from sqlalchemy import func, select

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    api_client,
    auth,
    create_key,
    files_under,
    image_set,
    make_tar,
    make_zip,
    service_env,
    settings_from,
    upload_job,
)

pytest_plugins = ["service_fixtures"]

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def api(pg_url, redis_ns, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("uploads-data")
    # A queue no worker consumes: accepted jobs stay queued.
    env = service_env(
        data_dir=data_dir, database_url=pg_url, redis={**redis_ns, "queue": redis_ns["queue"] + "-idle"},
        SP2OT_AUTH_REQUIRED="true",
        SP2OT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        SP2OT_MAX_ARCHIVE_FILES="200",
        SP2OT_MAX_UNCOMPRESSED_BYTES=str(40 * 1024 * 1024),
        SP2OT_COMPRESSION_RATIO_FLOOR=str(1024 * 1024),
        SP2OT_MAX_COMPRESSION_RATIO="50",
        SP2OT_MAX_IMAGE_PIXELS=str(1_000_000),
        SP2OT_MAX_UPLOAD_PIXELS=str(10_000_000),
    )
    settings = settings_from(env)
    with api_client(settings) as client:
        key = create_key(settings, "uploader")
        other = create_key(settings, "someone-else")
        yield {"client": client, "key": key, "other": other, "settings": settings, "data_dir": data_dir,
               "db": client.app.state.db}


@pytest.fixture
def nothing_left(api):
    """Asserts that the test left no job/dataset row and no file behind."""
    from app.models import Dataset, Job

    def counts():
        with api["db"].session() as s:
            return (s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(Dataset)))

    def files():
        return {d: files_under(api["data_dir"] / d) for d in ("jobs", "datasets", "tmp")}

    before = counts(), files()
    yield
    assert (counts(), files()) == before, "a rejected upload left rows or files behind"


def _detail(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body.get("detail"), str) and len(body["detail"]) > 15, body
    return body["detail"]


# -------------------------------------------------------------------------- bad archives
def test_not_an_archive(api, nothing_left):
    r = upload_job(api["client"], api["key"], b"just some text, not an archive" * 20, "images.zip", n_clusters=3)
    assert "not an archive" in _detail(r, 422)
    r = upload_job(api["client"], api["key"], image_set(1)["img_000_red_circle.png"], "image.png", n_clusters=3)
    assert "not an archive" in _detail(r, 422)


def test_empty_archives(api, nothing_left):
    assert "empty" in _detail(upload_job(api["client"], api["key"], b"", n_clusters=3), 422)
    assert "empty" in _detail(upload_job(api["client"], api["key"], make_zip({}), n_clusters=3), 422)
    assert "empty" in _detail(upload_job(api["client"], api["key"], make_tar({}), "x.tar.gz", n_clusters=3), 422)
    # Only folders: still no file.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/", b"")
        zf.writestr("a/b/", b"")
    assert "empty" in _detail(upload_job(api["client"], api["key"], buf.getvalue(), n_clusters=3), 422)


def test_archive_without_images(api, nothing_left):
    files = {"readme.txt": b"hello", "data/table.csv": b"a,b\n1,2\n", "fake.jpg": b"\xff\xd8 not really a jpeg"}
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), n_clusters=3), 422)
    assert "no readable image" in detail and "fake.jpg" in detail


def test_corrupt_tar_gz(api, nothing_left):
    data = make_tar(image_set(10))
    detail = _detail(upload_job(api["client"], api["key"], data[: len(data) // 2], "x.tar.gz", n_clusters=3), 422)
    assert "corrupt" in detail or "not a valid" in detail


@pytest.mark.parametrize("name", ["../escape.png", "a/../../escape.png", "/etc/escape.png", "C:/escape.png"])
def test_name_escaping_the_archive_zip(api, nothing_left, name):
    files = image_set(6)
    files[name] = files["img_000_red_circle.png"]
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), n_clusters=2), 422)
    assert "escape" in detail and name in detail


def test_name_escaping_the_archive_tar(api, nothing_left):
    files = image_set(6)
    files["../../escape.png"] = files["img_000_red_circle.png"]
    detail = _detail(upload_job(api["client"], api["key"], make_tar(files), "x.tgz", n_clusters=2), 422)
    assert "escape" in detail


@pytest.mark.parametrize("kind", ["sym", "hard"])
def test_links_are_refused(api, nothing_left, kind):
    data = make_tar(image_set(6), links={"link.png": (kind, "img_000_red_circle.png")})
    detail = _detail(upload_job(api["client"], api["key"], data, "x.tar.gz", n_clusters=2), 422)
    assert "link" in detail and "link.png" in detail


def test_zip_symlink_is_refused(api, nothing_left):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in image_set(4).items():
            zf.writestr(n, d)
        info = zipfile.ZipInfo("passwd.png")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    detail = _detail(upload_job(api["client"], api["key"], buf.getvalue(), n_clusters=2), 422)
    assert "symbolic link" in detail


def test_zip_bomb_declared_size(api, nothing_left):
    # 48 MiB of zeros compress to ~50 KiB: over the 40 MiB uncompressed limit (checked
    # from the zip directory before extracting anything).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in image_set(4).items():
            zf.writestr(n, d)
        with zf.open("zeros.bmp", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(48):
                f.write(chunk)
    assert len(buf.getvalue()) < MAX_UPLOAD
    detail = _detail(upload_job(api["client"], api["key"], buf.getvalue(), n_clusters=2), 422)
    assert "limit" in detail and "uncompressed" in detail


def test_tar_gz_bomb_ratio(api, nothing_left):
    # A tar.gz has no directory: the ratio is checked while decompressing. 8 MiB of zeros
    # -> ~8 KiB archive, ratio ~1000 > 50 once past the 1 MiB floor.
    files = image_set(4)
    files["zeros.raw"] = bytes(8 * 1024 * 1024)
    detail = _detail(upload_job(api["client"], api["key"], make_tar(files), "bomb.tar.gz", n_clusters=2), 422)
    assert "archive bomb" in detail


def test_pixel_budgets(api, nothing_left):
    """Read from the image headers (a 2000 x 2000 PNG header in a few hundred bytes), never
    decoded: one image over SP2OT_MAX_IMAGE_PIXELS, or all over SP2OT_MAX_UPLOAD_PIXELS."""
    from test_io_archive import png_claiming

    files = image_set(4)
    files["panorama.png"] = png_claiming(2000, 2000)
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), n_clusters=2), 422)
    assert "'panorama.png'" in detail and "4.0 megapixels" in detail and "SP2OT_MAX_IMAGE_PIXELS" in detail
    many = {f"p{i:02d}.png": png_claiming(1000, 1000) for i in range(11)}
    detail = _detail(upload_job(api["client"], api["key"], make_zip(many), "m.zip", n_clusters=2), 422)
    assert "11.0 megapixels in total" in detail and "SP2OT_MAX_UPLOAD_PIXELS" in detail


def test_too_many_files(api, nothing_left):
    files = {f"f{i:04d}.txt": b"x" for i in range(201)}
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), n_clusters=2), 422)
    assert "more than 200 files" in detail


def test_upload_over_the_size_limit(api, nothing_left):
    big = make_zip({"noise.bin": bytes(range(256)) * (MAX_UPLOAD // 256 + 4096)}, zipfile.ZIP_STORED)
    detail = _detail(upload_job(api["client"], api["key"], big, n_clusters=2), 413)
    assert "limit" in detail and "SP2OT_MAX_UPLOAD_BYTES" in detail


def test_upload_over_the_size_limit_without_content_length(api, nothing_left):
    """A chunked body (no Content-Length) is cut off while streaming."""
    boundary = "testboundary123"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"n_clusters\"\r\n\r\n3\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n"
               "Content-Type: application/zip\r\n\r\n").encode()
        for _ in range(MAX_UPLOAD // 65536 + 8):
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = api["client"].post("/jobs", content=body(),
                           headers={**auth(api["key"]), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "limit" in _detail(r, 413)


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize("k, expected", [(1, "greater than or equal to 2"), (0, "n_clusters"), ("abc", "n_clusters"),
                                         (13, "larger than the number of images (12)")])
def test_bad_n_clusters(api, nothing_left, k, expected):
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(12)), n_clusters=k), 422)
    assert expected in detail


def test_bad_k_range_and_unknown_fields(api, nothing_left):
    # n_clusters may be missing (the worker chooses K), but not its range beyond the images
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), k_max=5), 422)
    assert "k_max=5 is larger than the number of images (4)" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), k_min=3, k_max=2), 422)
    assert "k_min=3 is larger than k_max=2" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), n_clusters=2, nclusters=2), 422)
    assert "Unknown form field 'nclusters'" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), n_clusters=2, epochs=-1), 422)
    assert "epochs" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), n_clusters=2, mode="slow"), 422)
    assert "mode: Input should be 'fast' or 'full'" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(image_set(4)), n_clusters=2, init="tomato"), 422)
    assert "init: Input should be 'auto', 'density', 'spectral', 'kmeans' or 'random'" in detail


def test_missing_archive_and_wrong_content_types(api, nothing_left):
    c, h = api["client"], auth(api["key"])
    r = c.post("/jobs", files={"truth": ("t.csv", b"a,b\n", "text/csv")}, data={"n_clusters": "3"}, headers=h)
    assert "field 'archive'" in _detail(r, 422)
    r = c.post("/jobs", content=b"n_clusters=3", headers={**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert "multipart/form-data" in _detail(r, 415)
    r = c.post("/jobs", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert "JSON" in _detail(r, 422)
    r = c.post("/jobs", json={"dataset_id": "nope", "n_clusters": 3}, headers=h)
    assert "No dataset 'nope'" in _detail(r, 404)
    r = c.post("/jobs", json={"n_clusters": 3}, headers=h)
    assert "dataset_id" in _detail(r, 422)
    r = c.post("/jobs", json={"dataset_id": "x", "n_clusters": 3, "colour": "red"}, headers=h)
    assert "colour: unknown field" in _detail(r, 422)


def test_tar_gz_is_stored_decompressed_with_its_manifest_and_a_lenient_truth(api):
    """The check decompresses a tar.gz once; that tar is what is stored (the worker reads it by
    offset). A truth CSV without header, with semicolons and base names, is matched."""
    from sp2ot_engine.io.archive import Manifest

    c, key = api["client"], api["key"]
    files = image_set(6, folder="imgs/")
    truth = "".join(f"{name.rsplit('/', 1)[-1]};{name.rsplit('_', 1)[-1][:-4]}\n" for name in files)
    r = upload_job(c, key, make_tar(files), "shapes.tgz", truth=truth.encode(), n_clusters=2)
    assert r.status_code == 202, r.text
    job_dir = api["data_dir"] / "jobs" / r.json()["id"]
    assert sorted(p.name for p in job_dir.iterdir()) == ["truth.csv", "upload.tar", "upload.tar.manifest.json"]
    manifest = Manifest.read(job_dir / "upload.tar.manifest.json")
    assert manifest.kind == "tar" and manifest.names == sorted(files)
    assert manifest.source_bytes == (job_dir / "upload.tar").stat().st_size
    assert (job_dir / "truth.csv").read_text().splitlines()[:2] == ["filename,label", "imgs/img_000_red_circle.png,circle"]
    assert c.delete(f"/jobs/{r.json()['id']}", headers=auth(key)).status_code == 204


def test_truth_matching_no_image(api, nothing_left):
    files = image_set(6)
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), truth=b"filename,label\nother.png,a\n",
                                n_clusters=2), 422)
    assert "truth" in detail and "img_000_red_circle.png" in detail
    detail = _detail(upload_job(api["client"], api["key"], make_zip(files), truth=b"one,two,three\n", n_clusters=2), 422)
    assert "filename,label" in detail


# --------------------------------------------------------------------------- access
def test_authentication_required(api, nothing_left):
    c = api["client"]
    r = c.get("/jobs")
    assert "Authentication required" in _detail(r, 401)
    assert r.headers.get("www-authenticate", "").startswith("Bearer")
    assert "Invalid or revoked" in _detail(c.get("/jobs", headers=auth("sp2ot_wrong")), 401)
    assert "Bearer" in _detail(c.get("/jobs", headers={"Authorization": "Basic abc"}), 401)
    assert _detail(upload_job(c, None, make_zip(image_set(4)), n_clusters=2), 401)
    assert c.get("/health").status_code == 200  # health needs no key


def test_keys_are_isolated_and_jobs_are_listed(api):
    c, key, other = api["client"], api["key"], api["other"]
    r = upload_job(c, key, make_zip(image_set(6)), n_clusters=2)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and set(job["links"]) == {"self", "labels", "metrics", "cancel"}
    assert r.headers["location"] == f"/jobs/{job['id']}"
    jid = job["id"]
    for method, path in [("GET", f"/jobs/{jid}"), ("GET", f"/jobs/{jid}/labels.csv"), ("GET", f"/jobs/{jid}/metrics"),
                         ("POST", f"/jobs/{jid}/cancel"), ("DELETE", f"/jobs/{jid}")]:
        assert "No job" in _detail(c.request(method, path, headers=auth(other)), 404), path
    assert c.get("/jobs", headers=auth(other)).json()["total"] == 0
    # Labels before success: 409 with a clear message.
    detail = _detail(c.get(f"/jobs/{jid}/labels.csv", headers=auth(key)), 409)
    assert "queued" in detail and "succeeded" in detail
    assert "queued" in _detail(c.get(f"/jobs/{jid}/metrics", headers=auth(key)), 409)
    listing = c.get("/jobs", params={"status": "queued", "limit": 1}, headers=auth(key)).json()
    assert listing["total"] >= 1 and len(listing["items"]) == 1 and listing["limit"] == 1
    assert c.get("/jobs", params={"status": "succeeded"}, headers=auth(key)).json()["total"] == 0
    assert "status.0: Input should be 'queued'" in _detail(c.get("/jobs", params={"status": "done"},
                                                                 headers=auth(key)), 422)
    assert "limit" in _detail(c.get("/jobs", params={"limit": 0}, headers=auth(key)), 422)
    # Cancel a queued job: immediate; cancelling again is a no-op; delete removes everything.
    r = c.post(f"/jobs/{jid}/cancel", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert c.post(f"/jobs/{jid}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    assert "cancelled" in _detail(c.get(f"/jobs/{jid}/labels.csv", headers=auth(key)), 409)
    # the archive is stored as it came, its manifest next to it (nothing extracted)
    assert (api["data_dir"] / "jobs" / jid / "upload.zip").is_file()
    assert (api["data_dir"] / "jobs" / jid / "upload.zip.manifest.json").is_file()
    assert c.delete(f"/jobs/{jid}", headers=auth(key)).status_code == 204
    assert not (api["data_dir"] / "jobs" / jid).exists()
    assert "No job" in _detail(c.get(f"/jobs/{jid}", headers=auth(key)), 404)


def test_unknown_job_and_endpoint(api):
    c, h = api["client"], auth(api["key"])
    assert "No job 'does-not-exist'" in _detail(c.get("/jobs/does-not-exist", headers=h), 404)
    assert "No such endpoint" in _detail(c.get("/nothing-here", headers=h), 404)
    assert "not allowed" in _detail(c.put("/jobs", headers=h), 405)


def test_idempotency_key(api):
    c, key = api["client"], api["key"]
    h = {"Idempotency-Key": "retry-me-1"}
    first = upload_job(c, key, make_zip(image_set(6)), n_clusters=2, headers=h)
    assert first.status_code == 202, first.text
    # The retry is answered from the key alone: even a broken upload is not looked at.
    again = upload_job(c, key, b"garbage", n_clusters=2, headers=h)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # The same key of another API key is another job.
    r = upload_job(c, api["other"], make_zip(image_set(6)), n_clusters=2, headers=h)
    assert r.status_code == 202 and r.json()["id"] != first.json()["id"]
    jobs = c.get("/jobs", headers=auth(key)).json()["items"]
    assert [j["id"] for j in jobs].count(first.json()["id"]) == 1
    for k, j in ((key, first.json()["id"]), (api["other"], r.json()["id"])):
        assert c.delete(f"/jobs/{j}", headers=auth(k)).status_code == 204


# --------------------------------------------------------------------------- datasets
def test_dataset_upload_reports_skipped_files(api):
    c, key = api["client"], api["key"]
    files = image_set(9, folder="shapes/")
    # a PNG cut inside its header (one cut in its pixel data passes the upload's header check:
    # the worker skips it when it decodes, see test_api_jobs.test_upload_poll_download)
    files["shapes/broken.png"] = files["shapes/img_000_red_circle.png"][:20]
    files["shapes/notes.txt"] = b"not an image"
    files["inner.zip"] = make_zip(image_set(2))  # nested archive: skipped, reported
    files["__MACOSX/._x.png"] = b"meta"
    r = c.post("/datasets", files={"archive": ("shapes.zip", make_zip(files), "application/zip")},
               data={"name": "shapes"}, headers=auth(key))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["n_images"] == 9 and ds["name"] == "shapes"
    reasons = {s["name"]: s["reason"] for s in ds["skipped"]}
    assert "nested archive" in reasons["inner.zip"]
    assert "shapes/broken.png" in reasons and "shapes/notes.txt" in reasons
    assert c.get(f"/datasets/{ds['id']}", headers=auth(api["other"])).status_code == 404
    assert c.get("/datasets", headers=auth(key)).json()["total"] >= 1
    # A job on it (JSON body), K checked against its images.
    assert "larger than the number of images (9)" in _detail(
        c.post("/jobs", json={"dataset_id": ds["id"], "n_clusters": 10}, headers=auth(key)), 422)
    r = c.post("/jobs", json={"dataset_id": ds["id"], "n_clusters": 3}, headers=auth(key))
    assert r.status_code == 202 and r.json()["dataset_id"] == ds["id"]
    # Multipart with a dataset_id and a truth CSV (names as in the archive, or base names).
    truth = b"filename,label\nshapes/img_000_red_circle.png,red\nimg_001_green_square.png,green\n"
    r2 = c.post("/jobs", data={"dataset_id": ds["id"], "n_clusters": "2"},
                files={"truth": ("t.csv", truth, "text/csv")}, headers=auth(key))
    assert r2.status_code == 202 and r2.json()["has_truth"], r2.text
    assert (api["data_dir"] / "jobs" / r2.json()["id"] / "truth.csv").read_text().count("\n") == 3
    bad = c.post("/jobs", data={"dataset_id": ds["id"], "n_clusters": "2"},
                 files={"truth": ("t.csv", b"nothing.png,x\n", "text/csv")}, headers=auth(key))
    assert "No filename of the truth CSV" in _detail(bad, 422)
    # In use by queued jobs: 409; after cancelling them, deletion works.
    assert "used by 2 queued or running job" in _detail(c.delete(f"/datasets/{ds['id']}", headers=auth(key)), 409)
    c.post(f"/jobs/{r.json()['id']}/cancel", headers=auth(key))
    c.post(f"/jobs/{r2.json()['id']}/cancel", headers=auth(key))
    assert c.delete(f"/datasets/{ds['id']}", headers=auth(key)).status_code == 204
    assert not (api["data_dir"] / "datasets" / ds["id"]).exists()
    job = c.get(f"/jobs/{r.json()['id']}", headers=auth(key)).json()
    assert job["dataset_id"] is None and job["status"] == "cancelled"
    c.delete(f"/jobs/{job['id']}", headers=auth(key))
    c.delete(f"/jobs/{r2.json()['id']}", headers=auth(key))


def test_dataset_rejections_leave_nothing(api, nothing_left):
    c, h = api["client"], auth(api["key"])
    r = c.post("/datasets", files={"archive": ("x.zip", make_zip({"a.txt": b"x"}), "application/zip")}, headers=h)
    assert "no readable image" in _detail(r, 422)
    r = c.post("/datasets", data={"name": "x"}, files={"other": ("x", b"x")}, headers=h)
    assert "Unexpected file field 'other'" in _detail(r, 422)
    assert "No dataset" in _detail(c.get("/datasets/nope", headers=h), 404)
    assert "No dataset" in _detail(c.delete("/datasets/nope", headers=h), 404)


def test_openapi_documents_the_upload(api):
    from sp2ot_engine import options

    spec = api["client"].get("/openapi.json").json()
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/json" in body
    form = body["multipart/form-data"]["schema"]["properties"]
    assert form["archive"]["format"] == "binary"
    assert api["client"].get("/docs").status_code == 200
    # the allowed values come from the engine's vocabulary, listed in OpenAPI
    schemas = spec["components"]["schemas"]
    for name, values in {"Backbone": options.BACKBONES, "Mode": options.MODES, "Formulation": options.FORMULATIONS,
                         "Init": options.INITS, "JobStatus": ("queued", "running", "succeeded", "failed", "cancelled")
                         }.items():
        assert schemas[name]["enum"] == list(values), name
        if name != "JobStatus":
            assert form[name.lower()]["enum"] == list(values), name
    assert tuple(schemas["JobProgress"]["properties"]) == options.PROGRESS_FIELDS
    json_body = body["application/json"]["schema"]["properties"]
    assert json_body["init"]["anyOf"][0] == {"$ref": "#/components/schemas/Init"}  # a reference that resolves


def test_broker_down_means_503_and_nothing_left(api, tmp_path):
    """The job cannot be queued: the client gets a 503 to retry, and the job is not kept."""
    settings = api["settings"].model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "data_dir": tmp_path,
                                                  "run_migrations": False})
    jobs_before = api["client"].get("/jobs", headers=auth(api["key"])).json()["total"]
    with api_client(settings) as c:
        r = upload_job(c, api["key"], make_zip(image_set(6)), n_clusters=2)
        assert "queue" in _detail(r, 503) and "Try again" in r.json()["detail"]
        health = c.get("/health").json()
        assert health["status"] == "degraded" and not health["broker"]["ok"], health
    assert files_under(tmp_path / "jobs") == [] and files_under(tmp_path / "tmp") == []
    assert api["client"].get("/jobs", headers=auth(api["key"])).json()["total"] == jobs_before


def test_labels_csv_streams_many_rows_in_order(api):
    """12,345 rows (several fetch batches) written with COPY, streamed back in order, with
    awkward file names quoted correctly."""
    import csv

    from app import crud
    from app.models import Job, JobStatus, new_id
    from app.jobs.repository import bulk_insert_assignments

    db = api["db"]
    n = 12_345
    names = [f"dir/img,{i:05d} \"quoted\" é.png" if i % 1000 == 0 else f"dir/img_{i:05d}.png" for i in range(n)]
    job_id = new_id()
    with db.session() as s:
        owner = crud.owner_for_key(s, api["key"])
        s.add(Job(id=job_id, owner_id=owner.id, input_path="jobs/x", n_clusters=7, backbone="efficientnet_lite0",
                  mode="fast", formulation="sp2ot", seed=0, input_skipped=[], progress={}, status=JobStatus.SUCCEEDED,
                  summary={"n_images": n, "n_clusters": 7, "cluster_sizes": [], "n_skipped": 0, "skipped": []}))
        s.commit()
    with db.begin() as s:
        bulk_insert_assignments(s, job_id, names, [i % 7 for i in range(n)], [0.5] * n)
    r = api["client"].get(f"/jobs/{job_id}/labels.csv", headers=auth(api["key"]))
    assert r.status_code == 200
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    assert {tuple(row[3:]) for row in rows[1:]} == {("", "", "")}  # rows written without flags (an older job)
    assert [row[0] for row in rows[1:]] == names
    assert [int(row[1]) for row in rows[1:]] == [i % 7 for i in range(n)]
    assert api["client"].delete(f"/jobs/{job_id}", headers=auth(api["key"])).status_code == 204
