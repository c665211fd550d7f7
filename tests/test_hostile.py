"""Hostile input (issue 9): no request makes a 5xx, every upload has a bounded cost, one key
cannot take the service for itself, CSV output is safe to open in a spreadsheet. Every hostile
input is generated here."""
from __future__ import annotations

import io
import logging
import socket
import tarfile
import threading
import time

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    api_client,
    auth,
    create_key,
    files_under,
    image_set,
    job_state,
    make_job_row,
    make_zip,
    parse_labels_csv,
    service_env,
    settings_from,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


@pytest.fixture
def api(tmp_path, monkeypatch):
    """Settings (embedded mode, SQLite, fake estimator) for an app made by the test."""
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    return tmp_path, service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering")


def _counts(settings):
    from sqlalchemy import func, select

    from app.core.db import Database
    from app.models import Dataset, Job

    db = Database(settings)
    try:
        with db.session() as s:
            return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(Dataset))
    finally:
        db.dispose()


# ------------------------------------------------------------------------ 1. no 5xx
@pytest.mark.parametrize("url", [
    "/jobs?offset=9223372036854775808", "/datasets?offset=9223372036854775808", "/jobs?limit=100000",
    "/jobs?offset=-1", "/jobs?status=done", "/ui/jobs/x/images/99999999999999999999", "/?page=99999999999999999999",
])
def test_out_of_range_query_values_are_422_with_a_message(api, url):
    _, env = api
    with api_client(settings_from(env)) as c:
        r = c.get(url, headers={"Accept": "application/json"})
        assert r.status_code == 422, (url, r.status_code, r.text[:300])
        if r.headers["content-type"].startswith("application/json"):
            assert r.json()["detail"].startswith("Invalid request: ")
        assert c.get("/jobs").status_code == 200


@pytest.mark.parametrize("field,value", [("n_clusters", 2**63), ("epochs", 2**40), ("seed", 2**31),
                                         ("n_clusters", -5), ("seed", "x")])
def test_out_of_range_form_fields_are_422_and_leave_nothing(api, field, value):
    tmp_path, env = api
    settings = settings_from(env)
    with api_client(settings) as c:
        fields = {"n_clusters": 3, field: value}
        r = upload_job(c, None, make_zip(image_set(6)), **fields)
        assert r.status_code == 422, r.text
        assert field in r.json()["detail"]
        assert _counts(settings) == (0, 0)
        assert files_under(tmp_path / "jobs") == [] and files_under(tmp_path / "tmp") == []


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("pack", [make_zip, _tar], ids=["zip", "tar.gz"])
def test_member_names_over_255_bytes_are_skipped_and_listed(api, pack):
    _, env = api
    images = image_set(6)
    png = images["img_000_red_circle.png"]
    long_names = ["a" * 300 + ".png", "日" * 100 + ".png", "d" * 300 + "/x.png"]
    archive = pack({**images, **{n: png for n in long_names}})
    with api_client(settings_from(env)) as c:
        r = c.post("/datasets", files={"archive": ("x", archive)})
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["n_images"] == 6 and ds["n_skipped"] == 3
        assert {s["name"] for s in ds["skipped"]} == set(long_names)
        assert all("name too long" in s["reason"] for s in ds["skipped"])
        r = upload_job(c, None, archive, n_clusters=2)
        assert r.status_code == 202, r.text
        assert c.get("/jobs").json()["total"] == 1  # the same client goes on


def _serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


def _http_exchange(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_unexpected_exception_is_one_json_500_one_log_line_and_the_connection_stays_open(api, monkeypatch, caplog):
    from app.jobs import repository
    from app.main import create_app

    _, env = api

    def broken(*args, **kwargs):
        raise RuntimeError("the database driver fell over")

    monkeypatch.setattr(repository, "list_jobs", broken)
    server, thread, port = _serve_in_thread(create_app(settings_from(env)))
    try:
        with caplog.at_level(logging.INFO), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            first = _http_exchange(sock, "/jobs")
            second = _http_exchange(sock, "/health/live")  # the same keep-alive connection
    finally:
        server.should_exit = True
        thread.join(30)
    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500"), first
    import json

    answer = json.loads(body)
    assert set(answer) == {"detail", "request_id"} and answer["request_id"] in answer["detail"]
    assert f"x-request-id: {answer['request_id']}".encode() in head.lower()
    assert second.startswith(b"HTTP/1.1 200"), second
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and answer["request_id"] in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert "RuntimeError" in errors[0].getMessage() and errors[0].exc_info is None


def test_request_ids(api):
    _, env = api
    with api_client(settings_from(env)) as c:
        assert c.get("/jobs", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
        given = c.get("/jobs", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
        assert given != "bad id\twith spaces" and len(given) == 16
        assert c.get("/nope").headers["x-request-id"]


@pytest.mark.parametrize("path,allowed", [("/jobs", "GET, POST"), ("/jobs/abc", "DELETE, GET"),
                                          ("/datasets", "GET, POST")])
def test_405_lists_every_method_of_the_path(api, path, allowed):
    _, env = api
    with api_client(settings_from(env)) as c:
        for method in ("OPTIONS", "PUT", "PATCH"):
            r = c.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allowed, (method, r.headers)
            assert allowed in r.json()["detail"]


# ------------------------------------------------------------------------ 2. pixel budget
def test_a_pixel_bomb_is_refused_from_its_headers_with_the_default_budget(api):
    """10 PNGs of 9,400 x 9,400 (88 Mpx each, 1 bit per pixel: cheap to make) in a zip of a
    few KB: refused before anything is decoded, naming an image and the setting."""
    from PIL import Image

    tmp_path, env = api
    settings = settings_from(env)
    buf = io.BytesIO()
    Image.new("1", (9400, 9400), 0).save(buf, format="PNG")
    bomb = make_zip({f"photo_{i}.png": buf.getvalue() for i in range(10)})
    assert len(bomb) < 50_000
    with api_client(settings) as c:
        r = upload_job(c, None, bomb, n_clusters=2)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "'photo_0.png'" in detail and "88.4 megapixels" in detail and "SP2OT_MAX_IMAGE_PIXELS" in detail
        assert _counts(settings) == (0, 0) and files_under(tmp_path / "tmp") == []


def test_the_worker_never_decodes_an_image_over_the_budget(tmp_path):
    """The budget may be lower when a job runs than when its upload was checked: the images
    over it are skipped by their headers, never decoded."""
    from PIL import Image

    from sp2ot_engine.io.archive import inspect_archive
    from sp2ot_engine.io.collection import ImageCollection, ImageLoadError
    from sp2ot_engine.io.decode import ImageTooLarge, decode_image

    big, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (400, 300), "red").save(big, format="PNG")
    Image.new("RGB", (40, 30), "blue").save(small, format="PNG")
    with pytest.raises(ImageTooLarge, match="400 x 300"):
        decode_image(big.getvalue(), max_pixels=100_000)
    arc = tmp_path / "a.zip"
    arc.write_bytes(make_zip({"big.png": big.getvalue(), "small.png": small.getvalue()}))
    manifest = inspect_archive(arc)
    assert manifest.names == ["big.png", "small.png"]
    with ImageCollection.from_manifest(arc, manifest, verify=True, max_image_pixels=100_000) as images:
        assert images.names == ["small.png"]
        assert images.skipped[0][0] == "big.png" and "image too large" in images.skipped[0][1]
    with ImageCollection.from_manifest(arc, manifest, max_image_pixels=100_000) as images:
        with pytest.raises(ImageLoadError):
            images.load(0)


# ------------------------------------------------------------------------ 3. per-key fairness
def test_active_jobs_per_key_limit_is_429_with_retry_after(api, monkeypatch):
    tmp_path, env = api
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.2")
    settings = settings_from({**env, "SP2OT_MAX_ACTIVE_JOBS_PER_KEY": "1"})
    settings.ensure_dirs()
    with api_client(settings) as c:
        key, other = create_key(settings, "busy"), create_key(settings, "other")
        first = upload_job(c, key, make_zip(image_set(6)), n_clusters=2, epochs=50)
        assert first.status_code == 202, first.text
        r = upload_job(c, key, make_zip(image_set(6)), n_clusters=2)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) > 0 and "SP2OT_MAX_ACTIVE_JOBS_PER_KEY" in r.json()["detail"]
        assert c.get("/jobs", headers=auth(key)).json()["total"] == 1  # nothing was created
        assert files_under(tmp_path / "tmp") == []
        assert upload_job(c, other, make_zip(image_set(6)), n_clusters=2).status_code == 202  # another key
        c.post(f"/jobs/{first.json()['id']}/cancel", headers=auth(key))
        wait_for(c, key, first.json()["id"])
        assert upload_job(c, key, make_zip(image_set(6)), n_clusters=2).status_code == 202


def test_upload_bytes_per_hour_limit_is_429_with_retry_after(api):
    _, env = api
    archive = make_zip(image_set(6))
    settings = settings_from({**env, "SP2OT_MAX_UPLOAD_BYTES_PER_HOUR": str(len(archive) + 2000)})
    settings.ensure_dirs()
    with api_client(settings) as c:
        r = c.post("/datasets", files={"archive": ("a.zip", archive)})
        assert r.status_code == 201, r.text
        for send in (lambda: c.post("/datasets", files={"archive": ("a.zip", archive)}),
                     lambda: upload_job(c, None, archive, n_clusters=2),
                     lambda: c.post("/jobs/0123456789abcdef0123456789abcdef/assign",
                                    files={"archive": ("a.zip", archive)})):
            r = send()
            assert r.status_code == 429, r.text
            assert 0 < int(r.headers["retry-after"]) <= 3600
            assert "SP2OT_MAX_UPLOAD_BYTES_PER_HOUR" in r.json()["detail"]
        assert _counts(settings) == (0, 1)
        assert c.get("/jobs").status_code == 200  # reading is not limited


# ------------------------------------------------------------------------ 4. OpenAPI
def test_openapi_documents_errors_as_sent_and_closed_sets_as_enums(api):
    _, env = api
    with api_client(settings_from(env)) as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for code, answer in op["responses"].items():
                if code[0] in "45":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.rsplit("/", 1)[1] in ("ErrorOut", "ValidationErrorOut", "ServerErrorOut"), (path, code)
    status = next(p for p in doc["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "status")
    assert status["schema"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/JobStatus"}
    assert set(schemas["JobStatus"]["enum"]) == {"queued", "running", "succeeded", "failed", "cancelled"}
    offset = next(p for p in doc["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "offset")
    assert offset["schema"]["maximum"] == 10**9
    create = doc["paths"]["/jobs"]["post"]
    assert "429" in create["responses"] and create["security"] == [{"bearer": []}]
    form = create["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert all("maximum" in form[f] for f in ("n_clusters", "epochs", "seed"))


# ------------------------------------------------------------------------ 5. spreadsheet-safe CSV
def test_labels_csv_names_are_exact_by_default_and_quoted_when_spreadsheet_safe(api):
    _, env = api
    images = image_set(6)
    png = images["img_000_red_circle.png"]
    risky = ["=HYPERLINK(\"x\").png", "+1.png", "-2.png", "@sum.png"]
    archive = make_zip({**images, **{n: png for n in risky}})
    with api_client(settings_from(env)) as c:
        r = upload_job(c, None, archive, n_clusters=2)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert wait_for(c, None, job_id)["status"] == "succeeded"
        exact = {row["filename"] for row in parse_labels_csv(c.get(f"/jobs/{job_id}/labels.csv").text)}
        assert exact == set(images) | set(risky)
        for url in (f"/jobs/{job_id}/labels.csv?spreadsheet_safe=true",
                    f"/jobs/{job_id}/export?format=csv&spreadsheet_safe=true"):
            safe = {row["filename"] for row in parse_labels_csv(c.get(url).text)}
            assert safe == set(images) | {"'" + n for n in risky}, url


def test_spreadsheet_text_quotes_every_formula_start():
    from sp2ot_engine.io.labels_csv import format_labels, spreadsheet_text

    for start in "=+-@\t\r":
        assert spreadsheet_text(start + "x") == "'" + start + "x"
    assert spreadsheet_text("a=b") == "a=b" and spreadsheet_text("") == ""
    text = format_labels([("=1+1.png", 0, 0.5)], cluster_names={0: "-bad"}, spreadsheet_safe=True)
    assert text.splitlines()[1] == "'=1+1.png,0,0.5000,,,,'-bad"  # the flag columns empty for rows without them


# ------------------------------------------------------------------------ deleting a running job
class DeletedMidway:
    """An estimator whose job is deleted while it runs (its files with it): the reading fails."""

    def __init__(self, **kwargs):
        pass

    def fit(self, images, progress=None, should_stop=None):
        from app.core.db import Database
        from app.jobs import repository

        db = Database(DeletedMidway.settings)
        try:
            with db.begin() as s:
                repository.delete_job(s, DeletedMidway.job_id)
        finally:
            db.dispose()
        raise FileNotFoundError(2, "No such file or directory", "upload.zip")


def test_deleting_a_running_job_logs_no_error(sqlite_db, caplog):
    from app.jobs.runner import execute_job

    settings, db = sqlite_db
    settings = settings.model_copy(update={"estimator": "test_hostile:DeletedMidway"})
    job_id = make_job_row(settings, db, n_images=6)
    DeletedMidway.settings, DeletedMidway.job_id = settings, job_id
    with caplog.at_level(logging.INFO):
        outcome = execute_job(job_id, db=db, settings=settings)
    assert outcome == "superseded" and job_state(db, job_id) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("deleted or superseded" in r.getMessage() for r in caplog.records)
