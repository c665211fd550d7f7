"""The web pages, thumbnails, the 2-D map, curation, exports, login and CSRF, through the API
in-process (embedded mode, SQLite, the fake estimator: seconds). The browser tests are in
``test_ui_browser.py``."""
from __future__ import annotations

import io
import json
import re
import zipfile

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    api_client,
    auth,
    create_key,
    image_set,
    make_job_row,
    make_zip,
    parse_labels_csv,
    service_env,
    settings_from,
    truth_csv,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]

N_IMAGES = 30
BROWSER = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}  # what a browser adds


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A succeeded job of 30 images (3 colours, K=3) with a truth CSV, and the client."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    data_dir = tmp_path_factory.mktemp("ui-data")
    settings = settings_from(service_env(data_dir=data_dir, estimator="service_fixtures:FakeClustering"))
    images = image_set(N_IMAGES, folder="shapes/")
    with api_client(settings) as c:
        r = upload_job(c, None, make_zip(images), "shapes.zip", truth=truth_csv(images), n_clusters=3, epochs=2)
        assert r.status_code == 202, r.text
        job = wait_for(c, None, r.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        yield {"client": c, "job": job, "images": images, "settings": settings, "db": c.app.state.db}
    mp.undo()


def csrf_of(page_html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page_html).group(1)


def confidences(page_html: str) -> list[float]:
    return [float(x) for x in re.findall(r'<span class="conf">.*?</span></span>([0-9.]+)', page_html, re.S)]


def labels(c, job_id, headers=None) -> dict[str, int]:
    r = c.get(f"/jobs/{job_id}/labels.csv", headers=headers or {})
    assert r.status_code == 200, r.text
    return {row["filename"]: int(row["cluster"]) for row in parse_labels_csv(r.text)}


def post(c, url, body=None, token=None, headers=None):
    h = dict(headers or {})
    if token:
        h["X-CSRF-Token"] = token
    return c.post(url, json=body, headers=h) if body is not None else c.post(url, headers=h)


# ---------------------------------------------------------------------------------- pages
def test_home_page_has_the_upload_form_with_the_api_field_names(done):
    r = done["client"].get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    form = r.text[r.text.index('<form id="upload-form"'):r.text.index("</form>", r.text.index('id="upload-form"'))]
    for field in ("archive", "n_clusters", "mode", "backbone", "epochs", "formulation", "seed", "truth"):
        assert f'name="{field}"' in form, field
    assert "<details>" in form and form.index("<details>") < form.index('name="mode"')  # options folded away
    assert f'/ui/jobs/{done["job"]["id"]}' in r.text and "succeeded" in r.text
    assert "cdn" not in r.text.lower() and "https://" not in r.text  # nothing fetched from elsewhere


def test_result_view_shows_clusters_by_size_with_thumbnails(done):
    c, job = done["client"], done["job"]
    html = c.get(f"/ui/jobs/{job['id']}").text
    sizes = json.loads(re.search(r'<script type="application/json" id="sizes">(.*?)</script>', html, re.S).group(1))
    assert [s["size"] for s in sizes] == sorted(job["summary"]["cluster_sizes"], reverse=True)
    assert html.count('<article class="card') == 3
    thumbs = re.findall(rf'src="(/ui/jobs/{job["id"]}/thumbs/\d+\.jpg)"', html)
    assert len(thumbs) >= 3 * 8  # 8 most confident per cluster of 10 (+ least confident strips)
    t = c.get(thumbs[0])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert "immutable" in t.headers["cache-control"] and t.headers["etag"]
    from PIL import Image

    im = Image.open(io.BytesIO(t.content))
    assert im.format == "JPEG" and max(im.size) <= 128
    assert c.get(thumbs[0], headers={"If-None-Match": t.headers["etag"]}).status_code == 304
    assert c.get(f"/ui/jobs/{job['id']}/thumbs/{N_IMAGES}.jpg").status_code == 404
    for path in ("uncertain", "map", "metrics", "search?q=red", "clusters/0", "clusters/0?order=uncertain&page=1",
                 "images/0"):
        r = c.get(f"/ui/jobs/{job['id']}/{path}")
        assert r.status_code == 200, (path, r.text[:500])


def test_cluster_page_search_and_uncertain_are_paginated_and_ordered(done, monkeypatch):
    from app.ui import pages

    c, job = done["client"], done["job"]
    monkeypatch.setattr(pages, "IMAGES_PER_PAGE", 4)
    first = c.get(f"/ui/jobs/{job['id']}/uncertain").text
    confs = confidences(first)
    assert len(confs) == 4 and confs == sorted(confs) and "page 1 of 8" in first
    second = confidences(c.get(f"/ui/jobs/{job['id']}/uncertain?page=2").text)
    assert len(second) == 4 and min(second) >= max(confs)
    top = confidences(c.get(f"/ui/jobs/{job['id']}/clusters/0").text)
    assert top == sorted(top, reverse=True)
    found = c.get(f"/ui/jobs/{job['id']}/search?q=RED_circle").text
    names = re.findall(r'class="fname" title="([^"]+)"', found)
    assert len(names) == 4 and all("red_circle" in n for n in names) and "next &rarr;" in found
    assert "No file name contains" in c.get(f"/ui/jobs/{job['id']}/search?q=%25zzz").text  # % is literal


def test_map_is_stored_once_and_served_with_the_current_clusters(done):
    import numpy as np

    c, job = done["client"], done["job"]
    assert job["summary"].get("artifacts") is None  # the API's summary keeps its documented shape
    raw = c.get(f"/ui/jobs/{job['id']}/map.bin").content
    assert len(raw) == 12 * N_IMAGES
    xy = np.frombuffer(raw[:8 * N_IMAGES], dtype="<f4").reshape(-1, 2)
    clusters = np.frombuffer(raw[8 * N_IMAGES:], dtype="<i4")
    assert xy.min() >= 0 and xy.max() <= 1
    assert list(clusters) == [labels(c, job["id"])[f] for f in sorted(done["images"])]


def test_missing_or_unknown_things_are_404_pages_not_traces(done):
    c, job = done["client"], done["job"]
    for url in ("/ui/jobs/nope", f"/ui/jobs/{job['id']}/clusters/7", f"/ui/jobs/{job['id']}/images/999",
                "/ui/no-such-page"):
        r = c.get(url)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), url
        assert "Traceback" not in r.text and "<h1>Not found</h1>" in r.text
    assert c.get("/ui/jobs/nope/live.json").json()["detail"].startswith("No job")


# ------------------------------------------------------------------------------- curation
def test_curation_rename_merge_move_undo_reset(done):
    c, job = done["client"], done["job"]
    jid = job["id"]
    original = labels(c, jid)
    r = post(c, f"/jobs/{jid}/curation/rename", {"cluster": 1, "name": "  green\tsquares "})
    assert r.status_code == 200, r.text
    assert r.json()["curated"] and {"id": 1, "name": "green squares", "size": original_size(original, 1)} in \
        r.json()["clusters"]
    csv = c.get(f"/jobs/{jid}/labels.csv")
    assert csv.headers["x-sp2ot-curated"] == "true" and "curated" in csv.headers["content-disposition"]

    r = post(c, f"/jobs/{jid}/curation/merge", {"clusters": [2], "into": 0})
    assert r.status_code == 200 and r.json()["done"]["count"] == original_size(original, 2)
    merged = labels(c, jid)
    assert all(merged[f] == (0 if k == 2 else k) for f, k in original.items())
    m = c.get(f"/jobs/{jid}/metrics").json()
    assert m["curated"] and m["curation_edits"] == 2 and m["cluster_sizes"][2] == 0
    assert m["cluster_sizes"][0] == original_size(original, 0) + original_size(original, 2)

    some = sorted(f for f, k in original.items() if k == 1)[:2]
    r = post(c, f"/jobs/{jid}/curation/move", {"images": some, "to": "new"})
    assert r.status_code == 200 and r.json()["done"] == {"to": 3, "count": 2}
    assert all(labels(c, jid)[f] == 3 for f in some)
    assert "moved 2 image(s)" in r.json()["history"][0]["text"]
    assert c.get(f"/ui/jobs/{jid}/clusters/3").status_code == 200

    assert post(c, f"/jobs/{jid}/curation/undo").status_code == 200
    assert labels(c, jid) == merged
    assert post(c, f"/jobs/{jid}/curation/undo").status_code == 200  # the merge
    assert labels(c, jid) == original
    r = post(c, f"/jobs/{jid}/curation/reset")  # the rename is left
    assert r.status_code == 200 and r.json()["done"] == {"edits_removed": 1, "images_restored": 0}
    assert labels(c, jid) == original
    plain = c.get(f"/jobs/{jid}/labels.csv")
    assert plain.headers["x-sp2ot-curated"] == "false"
    assert plain.text.startswith("filename,cluster,confidence,outlier_score,outlier,duplicate_of\r\n")
    assert post(c, f"/jobs/{jid}/curation/undo").status_code == 409


def original_size(labels_by_file: dict[str, int], cluster: int) -> int:
    return sum(1 for k in labels_by_file.values() if k == cluster)


def test_reset_restores_images_moved_several_times(done):
    c, jid = done["client"], done["job"]["id"]
    original = labels(c, jid)
    name = sorted(original)[0]
    for to in (1, 2, 0, "new"):
        assert post(c, f"/jobs/{jid}/curation/move", {"images": [name], "to": to}).status_code == 200
    post(c, f"/jobs/{jid}/curation/merge", {"clusters": [0, 1], "into": 2})
    assert labels(c, jid) != original
    r = post(c, f"/jobs/{jid}/curation/reset")
    assert r.status_code == 200 and r.json()["done"]["edits_removed"] == 5
    assert labels(c, jid) == original and not c.get(f"/jobs/{jid}/curation").json()["curated"]


@pytest.mark.parametrize("action, body, message", [
    ("rename", {"cluster": 9, "name": "x"}, "has no cluster 9"),
    ("rename", {"cluster": 0, "name": "   "}, "must not be empty"),
    ("merge", {"clusters": [1, 42], "into": 0}, "has no cluster 42"),
    ("merge", {"clusters": [0], "into": 0}, "other than"),
    ("move", {"images": ["shapes/img_000_red_circle.png", "nope.png"], "to": 1}, "no image 'nope.png'"),
    ("move", {"images": ["shapes/img_000_red_circle.png"], "to": -1}, "has no cluster -1"),
])
def test_a_curation_naming_something_missing_is_a_422_and_changes_nothing(done, action, body, message):
    c, jid = done["client"], done["job"]["id"]
    before = labels(c, jid)
    r = post(c, f"/jobs/{jid}/curation/{action}", body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert labels(c, jid) == before
    state = c.get(f"/jobs/{jid}/curation").json()
    assert state["edits"] == 0 and all(not cl["name"].startswith("x") for cl in state["clusters"])


def test_curation_and_export_of_a_job_that_has_not_succeeded_are_409(done):
    settings, db = done["settings"], done["db"]
    c = done["client"]
    from app import crud

    with db.session() as s:
        owner_id = crud.local_owner(s).id
    jid = make_job_row(settings, db, owner_id=owner_id, status="running")
    for fmt in ("json", "zip", "labelstudio", "csv"):
        r = c.get(f"/jobs/{jid}/export?format={fmt}")
        assert r.status_code == 409 and "running" in r.json()["detail"]
    assert post(c, f"/jobs/{jid}/curation/rename", {"cluster": 0, "name": "a"}).status_code == 409
    assert c.get(f"/jobs/{jid}/export?format=pdf").status_code == 422
    assert c.get("/jobs/nope/export?format=csv").status_code == 404
    page = c.get(f"/ui/jobs/{jid}")
    assert page.status_code == 200 and 'id="live"' in page.text  # the progress view
    assert c.get(f"/ui/jobs/{jid}/clusters/0").status_code == 409


# -------------------------------------------------------------------------------- exports
def test_exports_show_the_curated_clusters(done):
    c, jid = done["client"], done["job"]["id"]
    post(c, f"/jobs/{jid}/curation/rename", {"cluster": 0, "name": "reds/and more"})
    post(c, f"/jobs/{jid}/curation/merge", {"clusters": [2], "into": 1})
    current = labels(c, jid)
    try:
        r = c.get(f"/jobs/{jid}/export?format=csv")
        assert r.headers["x-sp2ot-curated"] == "true" and "curated" in r.headers["content-disposition"]
        rows = parse_labels_csv(r.text)
        assert {row["filename"]: int(row["cluster"]) for row in rows} == current
        assert r.text.startswith("filename,cluster,confidence,outlier_score,outlier,duplicate_of,cluster_name\r\n")
        assert {row["cluster_name"] for row in rows if row["cluster"] == "0"} == {"reds/and more"}
        assert r.text == c.get(f"/jobs/{jid}/labels.csv").text

        data = c.get(f"/jobs/{jid}/export?format=json").json()
        assert data["curated"] is True and data["curation_edits"] == 2
        assert {im["filename"]: im["cluster"] for im in data["images"]} == current
        assert {im["cluster_name"] for im in data["images"] if im["cluster"] == 0} == {"reds/and more"}
        by_id = {cl["id"]: cl for cl in data["clusters"]}
        assert by_id[2]["size"] == 0 and by_id[1]["size"] == sum(1 for k in current.values() if k == 1)
        assert by_id[0]["name"] == "reds/and more" and len(by_id[0]["representatives"]) == 5
        assert set(data["images"][0]) == {"filename", "cluster", "cluster_name", "confidence", "outlier_score",
                                          "outlier", "duplicate_of"}
        # the fake flags the last image as an outlier; none of these names says "copy"
        assert [im["outlier"] for im in data["images"]][-2:] == [False, True]
        assert {im["duplicate_of"] for im in data["images"]} == {None} and data["k_choice"] is None

        tasks = c.get(f"/jobs/{jid}/export?format=labelstudio").json()
        assert len(tasks) == N_IMAGES
        t = tasks[0]
        pred = t["predictions"][0]
        assert pred["result"][0]["type"] == "choices" and pred["score"] == pred["result"][0]["score"]
        assert pred["result"][0]["value"]["choices"] == [data["images"][0]["cluster_name"]]
        assert t["data"]["image"].endswith(f"/ui/jobs/{jid}/original/0") and t["meta"]["curated"]
        assert c.get(t["data"]["image"]).status_code == 200

        r = c.get(f"/jobs/{jid}/export?format=zip")
        assert r.headers["content-type"] == "application/zip"
        zf = zipfile.ZipFile(io.BytesIO(r.content))
        names = set(zf.namelist())
        expected = {f"{'reds_and more' if k == 0 else f'cluster_{k}'}/{f}" for f, k in current.items()}
        assert names == expected | {"labels.csv", "export.txt"}
        some = sorted(done["images"])[0]
        assert zf.read(f"{'reds_and more' if current[some] == 0 else f'cluster_{current[some]}'}/{some}") == \
            done["images"][some]
        assert "curated: yes, 2 edit(s)" in zf.read("export.txt").decode()
    finally:
        post(c, f"/jobs/{jid}/curation/reset")


def test_zip_export_streams_in_chunks_of_bounded_size(tmp_path):
    """Memory flat in the archive size: no chunk of the stream holds more than one read. The
    originals come from a stored upload (a zip and its manifest, as the API stores it)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from app import exports
    from sp2ot_engine.io.archive import inspect_archive, manifest_path

    blobs = {}
    rng = np.random.default_rng(0)
    for i in range(3):  # noise does not compress: each PNG is over 3 reads long
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (1100, 1000, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
        blobs[f"big_{i}.png"] = buf.getvalue()
        assert len(blobs[f"big_{i}.png"]) > 3 * exports.ZIP_CHUNK + 17
    stored = tmp_path / "upload.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as z:
        for name, data in blobs.items():
            z.writestr(name, data)
    inspect_archive(stored).write(manifest_path(stored))
    rows = [[(i, name, i % 2, 0.5) for i, name in enumerate(sorted(blobs))]]

    saved = exports._rows, exports.snapshot
    from app.results import Cluster, CurationInfo

    exports._rows = lambda db, job_id: iter(rows)
    exports.snapshot = lambda db, job: ([Cluster(0, "cluster 0", 2, False), Cluster(1, "cats", 1, True)],
                                        CurationInfo(0, 0))
    try:
        chunks = list(exports.zip_stream(None, SimpleNamespace(id="j"), stored))
    finally:
        exports._rows, exports.snapshot = saved
    assert max(len(ch) for ch in chunks) <= exports.ZIP_CHUNK + 4096
    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert zf.testzip() is None
    assert sorted(zf.namelist()) == sorted(["cluster_0/big_0.png", "cats/big_1.png", "cluster_0/big_2.png",
                                            "labels.csv", "export.txt"])
    assert zf.read("cats/big_1.png") == blobs["big_1.png"]


# --------------------------------------------------------------------------- CSRF, login
def test_browser_requests_that_change_something_need_the_csrf_token(done):
    c, jid = done["client"], done["job"]["id"]
    url = f"/jobs/{jid}/curation/rename"
    r = post(c, url, {"cluster": 0, "name": "forged"}, headers=BROWSER)
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = post(c, url, {"cluster": 0, "name": "forged"}, token="0" * 64, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert c.post(f"/jobs/{jid}/cancel", headers=BROWSER).status_code == 403
    assert c.get("/jobs/" + jid + "/curation").json()["edits"] == 0
    token = csrf_of(c.get("/").text)
    r = post(c, url, {"cluster": 0, "name": "mine"}, token=token, headers=BROWSER)
    assert r.status_code == 200, r.text
    assert post(c, f"/jobs/{jid}/curation/undo", token=token, headers=BROWSER).status_code == 200


def test_login_cookie_scopes_pages_and_thumbnails_to_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    settings = settings_from(service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering",
                                         SP2OT_AUTH_REQUIRED="true"))
    with api_client(settings) as c:
        alice, bob = create_key(settings, "alice"), create_key(settings, "bob")
        r = upload_job(c, alice, make_zip(image_set(9)), n_clusters=3, epochs=1)
        jid = r.json()["id"]
        assert wait_for(c, alice, jid, timeout=60)["status"] == "succeeded"

        r = c.get(f"/ui/jobs/{jid}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/login?next=%2Fui%2Fjobs%2F{jid}"
        assert c.get(f"/ui/jobs/{jid}/thumbs/0.jpg").status_code == 401
        r = c.post("/ui/login", data={"key": "sp2ot_wrong", "next": "/"})
        assert r.status_code == 401 and "not valid" in r.text and "sp2ot_key" not in c.cookies

        r = c.post("/ui/login", data={"key": bob, "next": f"/ui/jobs/{jid}"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{jid}"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and bob in cookie
        r = c.get(f"/ui/jobs/{jid}")
        assert r.status_code == 404 and "<h1>Not found</h1>" in r.text  # another key's job
        assert c.get(f"/ui/jobs/{jid}/thumbs/0.jpg").status_code == 404
        assert c.get(f"/ui/jobs/{jid}/original/0").status_code == 404
        assert c.get(f"/jobs/{jid}/export?format=csv").status_code == 404

        c.cookies.clear()
        c.post("/ui/login", data={"key": alice, "next": "/"})
        page = c.get(f"/ui/jobs/{jid}")
        assert page.status_code == 200 and 'class="card' in page.text
        assert c.get(f"/ui/jobs/{jid}/thumbs/0.jpg").headers["content-type"] == "image/jpeg"
        token = csrf_of(page.text)
        # The cookie alone cannot change anything: another site could make the browser send it.
        assert post(c, f"/jobs/{jid}/curation/rename", {"cluster": 0, "name": "a"}).status_code == 403
        assert post(c, f"/jobs/{jid}/curation/rename", {"cluster": 0, "name": "a"}, token=token).status_code == 200
        # A token is bound to its session: bob's token does not go with alice's cookie.
        from app.core.security import csrf_token

        assert post(c, f"/jobs/{jid}/curation/undo", token=csrf_token(c.app.state.secret, bob)).status_code == 403
        assert post(c, f"/jobs/{jid}/curation/undo", headers=auth(alice)).status_code == 200  # bearer: no token
        assert c.post("/ui/logout", data={"csrf_token": "bad"}).status_code == 403
        r = c.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False)
        assert r.status_code == 303 and 'sp2ot_key=""' in r.headers["set-cookie"]


def test_csrf_token_is_bound_to_the_session_and_the_server_secret(tmp_path):
    from app.core.security import csrf_token, load_or_create_secret

    secret = load_or_create_secret("", tmp_path / "secret_key")
    assert load_or_create_secret("", tmp_path / "secret_key") == secret and len(secret) == 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert csrf_token(secret, "key-a") != csrf_token(secret, "key-b")
    assert csrf_token(secret, "key-a") != csrf_token(b"another", "key-a")
    assert load_or_create_secret("configured", tmp_path / "x") == b"configured" and not (tmp_path / "x").exists()


def test_a_job_stored_before_uploads_had_manifests(tmp_path, monkeypatch):
    """An upload stored as a folder of extracted images (before the manifests) still runs: its
    manifest is made from the headers, the thumbnails from the decoded images, and its
    originals are served and zipped."""
    from app import crud
    from app.models import Job, new_id
    from app.storage import Storage

    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    settings = settings_from(service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering"))
    images = image_set(9)
    with api_client(settings) as c:
        storage, db = Storage(settings), c.app.state.db
        jid = new_id()
        folder = storage.job_dir(jid) / "images"
        folder.mkdir(parents=True)
        for name, data in images.items():
            (folder / name).write_bytes(data)
        with db.session() as s:
            s.add(Job(id=jid, owner_id=crud.local_owner(s).id, input_path=storage.rel(folder), owns_input=True,
                      input_name="old.zip", n_images=9, n_clusters=3, backbone="efficientnet_lite0", mode="fast",
                      epochs=1, formulation="sp2ot", seed=0, input_skipped=[], progress={}, status="queued"))
            s.commit()
        c.app.state.job_queue.submit(jid)
        assert wait_for(c, None, jid, timeout=60)["status"] == "succeeded"
        assert c.get(f"/ui/jobs/{jid}/thumbs/0.jpg").headers["content-type"] == "image/jpeg"
        name = sorted(images)[4]
        r = c.get(f"/ui/jobs/{jid}/original/4")
        assert r.status_code == 200 and r.content == images[name]
        zf = zipfile.ZipFile(io.BytesIO(c.get(f"/jobs/{jid}/export?format=zip").content))
        assert sorted(n.split("/", 1)[1] for n in zf.namelist() if "/" in n) == sorted(images)


def test_open_uploads_are_shared_and_dropped(tmp_path):
    """The originals' collections are kept open between requests, and dropped (closed once
    unused) when their manifest changes, their folder is removed, there are too many, or they
    sit idle."""
    import os
    import time

    from app.storage import OpenUploads
    from sp2ot_engine.io.archive import inspect_archive, manifest_path

    def stored(name: str, n: int):
        path = tmp_path / name / "upload.zip"
        path.parent.mkdir()
        path.write_bytes(make_zip(image_set(n)))
        inspect_archive(path).write(manifest_path(path))
        return path

    a, b, c = stored("a", 3), stored("b", 4), stored("c", 5)
    cache = OpenUploads(size=2, idle=0.3)
    closed = []

    def watch(images):
        images.close = lambda: closed.append(len(images))
        return images

    with cache.use(a) as first:
        watch(first)
        with cache.use(a) as again:
            assert again is first and len(first) == 3
    with cache.use(b) as images_b:
        watch(images_b)
        with cache.use(c) as images_c:  # a third: the least recently used (a) goes
            watch(images_c)
            assert closed == [3]
        cache.forget(tmp_path / "b")  # in use: closed when its user is done
        assert closed == [3] and images_b.read_bytes(0)
    assert closed == [3, 4]
    st = manifest_path(c).stat()  # the manifest rewritten: a new stamp, reopened
    os.utime(manifest_path(c), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with cache.use(c) as reopened:
        assert reopened is not images_c and closed == [3, 4, 5]
        watch(reopened)
    time.sleep(1.0)  # idle: the timer closes it
    assert closed == [3, 4, 5, 5] and not cache._open
    with pytest.raises(ValueError):
        with cache.use(tmp_path / "nothing" / "upload.zip"):
            pass


# ------------------------------------------------------------------------------ artifacts
def test_thumbnails_of_every_kind_of_image(tmp_path):
    """Made from the images the engine's verification decodes (its on_decoded hook), in
    threads; written in the order of the names asked for."""
    from PIL import Image

    from app.jobs import artifacts
    from sp2ot_engine.io.collection import scan_images

    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (1600, 1200), (200, 10, 10)).save(root / "big.jpg", quality=90)
    Image.new("RGBA", (300, 80), (0, 0, 255, 0)).save(root / "clear.png")
    Image.new("L", (50, 40), 128).save(root / "grey.png")
    Image.new("P", (64, 64)).save(root / "palette.gif")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    names = ["big.jpg", "clear.png", "grey.png", "palette.gif", "broken.jpg"]
    seen = []
    with artifacts.Thumbnails(tmp_path / "job") as thumbs:
        with scan_images(root, threads=2, on_decoded=thumbs) as images:
            assert "broken.jpg" not in images.names
        made = thumbs.write(names, progress=lambda stage, pct: seen.append((stage, pct)))
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [artifacts.THUMBS_BIN, artifacts.THUMBS_IDX]
    assert made == 4 and seen[-1] == ("thumbnails", 100.0)
    sizes = [Image.open(io.BytesIO(artifacts.read_thumbnail(tmp_path / "job", i))).size for i in range(4)]
    assert sizes == [(128, 96), (128, 34), (50, 40), (64, 64)]
    big = Image.open(io.BytesIO(artifacts.read_thumbnail(tmp_path / "job", 0))).convert("RGB")
    assert big.getpixel((64, 48))[0] > 150
    clear = Image.open(io.BytesIO(artifacts.read_thumbnail(tmp_path / "job", 1))).convert("RGB")
    assert min(clear.getpixel((10, 10))) > 240  # transparency flattened onto white
    assert artifacts.read_thumbnail(tmp_path / "job", 4) == b""
    assert artifacts.read_thumbnail(tmp_path / "job", 5) is None
    assert artifacts.read_thumbnail(tmp_path / "nothing", 0) is None
    with pytest.raises(artifacts.Stopped), artifacts.Thumbnails(tmp_path / "job2") as thumbs:
        scan_images(root, on_decoded=thumbs).close()
        thumbs.write(names, should_stop=lambda: True)
    assert not list((tmp_path / "job2").iterdir())  # nothing half-written left


@pytest.mark.parametrize("n", [6, 400])
def test_projection_keeps_separated_groups_apart(n):
    import numpy as np

    from app.jobs import artifacts

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 64)) * 10
    labels_ = np.arange(n) % 4
    feats = centres[labels_] + rng.normal(size=(n, 64))
    xy, method = artifacts.project_2d(feats, seed=0)
    assert method == ("pca" if n < artifacts.TSNE_MIN_IMAGES else "tsne")
    assert xy.shape == (n, 2) and xy.dtype == np.float32 and xy.min() >= 0 and xy.max() <= 1
    if n >= artifacts.TSNE_MIN_IMAGES:  # too few images for a neighbour of the same group
        d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        assert (labels_[d.argmin(axis=1)] == labels_).mean() > 0.95


def test_running_job_progress_keeps_a_bounded_loss_curve(sqlite_db):
    from app.jobs.runner import CURVE_POINTS, JobRun

    settings, db = sqlite_db
    run = JobRun(db, settings.model_copy(update={"progress_interval": 0.0}), "j", 1)
    written = []
    run.write_progress = written.append
    for step in range(1000):
        run.progress({"stage": "training", "percent": step / 10, "step": step, "loss": 1 / (step + 1), "rho": 0.5})
    curve = written[-1]["curve"]
    assert 0 < len(curve) <= CURVE_POINTS and curve[0] == [0, 1.0, 0.5]
    assert [p[0] for p in curve] == sorted(p[0] for p in curve) and curve[-1][0] >= 900


def test_metrics_of_a_curated_job_are_recomputed_for_each_curation_state(done):
    c, jid = done["client"], done["job"]["id"]
    before = c.get(f"/jobs/{jid}/metrics").json()
    assert not before["curated"] and before["evaluation"]["acc"] == pytest.approx(1.0)  # colours = classes
    page = c.get(f"/ui/jobs/{jid}/metrics").text
    assert page.count('<tr class="') == 3 and "with the curated clusters" not in page
    try:
        post(c, f"/jobs/{jid}/curation/merge", {"clusters": [2], "into": 0})
        merged = c.get(f"/jobs/{jid}/metrics").json()
        assert merged["curated"] and merged["evaluation"]["acc"] == pytest.approx(2 / 3)
        assert "with the curated clusters" in c.get(f"/ui/jobs/{jid}/metrics").text
        post(c, f"/jobs/{jid}/curation/undo")
        post(c, f"/jobs/{jid}/curation/rename", {"cluster": 0, "name": "reds"})  # may reuse the merge's id
        assert c.get(f"/jobs/{jid}/metrics").json()["evaluation"]["acc"] == pytest.approx(1.0)
    finally:
        post(c, f"/jobs/{jid}/curation/reset")
