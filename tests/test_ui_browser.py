"""The web pages in a real browser: Playwright for Python driving Debian's Chromium, against
``sp2ot serve`` (embedded mode, the real engine). Skips, saying why, only where Chromium or
Playwright is absent."""
from __future__ import annotations

import csv
import io
import re
import time
import zipfile

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ServeProcess,
    chromium_missing,
    image_set,
    launch_chromium,
    make_zip,
    service_env,
)

pytest_plugins = ["service_fixtures"]

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))


@pytest.fixture
def browser_page(tmp_path, engine_path):
    """A server, a browser page on it, and the JavaScript errors the page meets."""
    from playwright.sync_api import sync_playwright

    server = ServeProcess(service_env(data_dir=tmp_path / "data", estimator=engine_path), tmp_path / "serve.log")
    server.wait_ready()
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            context = browser.new_context(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text} {m.location}"))
            yield {"page": page, "base": f"http://127.0.0.1:{server.port}", "errors": errors, "server": server,
                   "tmp": tmp_path}
            browser.close()
    finally:
        server.stop()


def _csv(page, base, job_id) -> list[dict[str, str]]:
    r = page.request.get(f"{base}/jobs/{job_id}/labels.csv")
    assert r.ok, r.text()
    return list(csv.DictReader(io.StringIO(r.text())))


def _all_thumbnails_loaded(page) -> None:
    page.wait_for_function(
        "() => { const ims = Array.from(document.querySelectorAll('.cards img, .grid img'));"
        " return ims.length > 0 && ims.every(i => i.complete && i.naturalWidth > 0); }", timeout=20_000)


def test_upload_watch_curate_and_export_in_a_browser(browser_page):
    page, base, errors = browser_page["page"], browser_page["base"], browser_page["errors"]
    archive = browser_page["tmp"] / "shapes.zip"
    archive.write_bytes(make_zip(image_set(42, folder="shapes/")))

    # Upload through the form (the home page), options unfolded for a short run.
    page.goto(base + "/")
    assert page.title().startswith("Cluster images")
    page.set_input_files('input[name="archive"]', str(archive))
    page.fill('input[name="n_clusters"]', "3")
    page.click("details > summary")
    page.fill('input[name="epochs"]', "2")
    page.click('button[type="submit"]')
    page.wait_for_url(re.compile(r".*/ui/jobs/[0-9a-f]{32}$"), timeout=60_000)
    job_id = page.url.rsplit("/", 1)[1]

    # Live progress until the same page becomes the result view.
    seen_status, seen_stage, widths = set(), set(), []
    deadline = time.time() + 240
    while time.time() < deadline and page.locator("article.card").count() == 0:
        try:
            if page.locator("#live-status").count():
                seen_status.add(page.inner_text("#live-status"))
                seen_stage.add(page.inner_text("#live-stage"))
                widths.append(page.eval_on_selector("#live-bar", "e => parseFloat(e.style.width) || 0"))
        except Exception:  # the page reloads into the result view between two reads
            pass
        time.sleep(0.25)
    assert page.locator("article.card").count() == 3, (seen_status, browser_page["server"].log())
    assert seen_status & {"queued", "running"} and any(s.startswith("stage:") for s in seen_stage), seen_stage
    assert "failed" not in seen_status

    # The result view: K clusters, their thumbnails loaded, a size bar per cluster.
    _all_thumbnails_loaded(page)
    assert page.locator("#size-chart rect").count() == 3
    sizes = [int(s.split()[0]) for s in page.locator("article.card .size").all_inner_texts()]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 42

    # Rename the largest cluster: the CSV gets its name.
    first = page.locator("article.card").nth(0)
    cluster_id = first.get_attribute("data-cluster")
    page.once("dialog", lambda d: d.accept("Big ones"))
    first.locator("button.rename").click()
    page.wait_for_function("() => document.querySelector('article.card .name').textContent === 'Big ones'")
    rows = _csv(page, base, job_id)
    assert {r["cluster_name"] for r in rows if r["cluster"] == cluster_id} == {"Big ones"}

    # Merge the two others into the largest: the CSV has two clusters left.
    others = [page.locator("article.card").nth(i).get_attribute("data-cluster") for i in (1, 2)]
    for i in (0, 1, 2):
        page.locator("article.card").nth(i).locator(".merge-pick").check()
    page.select_option("#merge-into", cluster_id)
    page.click('[data-action="merge"]')
    page.wait_for_function("() => document.querySelectorAll('article.card.empty').length === 2")
    rows = _csv(page, base, job_id)
    assert {r["cluster"] for r in rows} == {cluster_id} and len(rows) == 42
    assert page.locator(".badge.curated").inner_text().startswith("curated · 2 edits")

    # Undo the merge; the zip export then has one folder per cluster with the right files.
    page.click('[data-action="undo"]')
    page.wait_for_function("() => document.querySelectorAll('article.card.empty').length === 0")
    rows = _csv(page, base, job_id)
    with page.expect_download() as download:
        page.click("text=ZIP (folder per cluster)")
    zf = zipfile.ZipFile(download.value.path())
    folder = {cluster_id: "Big ones", **{o: f"cluster_{o}" for o in others}}
    assert set(zf.namelist()) == {f"{folder[r['cluster']]}/{r['filename']}" for r in rows} | {"labels.csv",
                                                                                              "export.txt"}

    # Every other page: thumbnails load, no JavaScript error.
    for path in (f"/clusters/{cluster_id}", "/uncertain", "/search?q=red"):
        page.goto(f"{base}/ui/jobs/{job_id}{path}")
        _all_thumbnails_loaded(page)
    page.goto(f"{base}/ui/jobs/{job_id}/map")
    page.wait_for_function("() => document.querySelectorAll('#map-legend li').length === 3")
    page.goto(f"{base}/ui/jobs/{job_id}/images/0")
    page.wait_for_function("() => document.querySelector('figure.original img').naturalWidth > 0")
    page.goto(f"{base}/ui/jobs/{job_id}/metrics")
    page.goto(base + "/")
    assert page.locator(f'tr[data-job="{job_id}"] .badge').inner_text() == "succeeded"
    assert errors == [], errors

    # A job that does not exist: a 404 page (the browser logs the 404 status itself, nothing else).
    page.goto(f"{base}/ui/jobs/not-a-job")
    assert page.inner_text("h1") == "Not found" and "no job not-a-job" in page.inner_text(".detail")
    assert len(errors) == 1 and "status of 404" in errors[0] and "/ui/jobs/not-a-job" in errors[0], errors
