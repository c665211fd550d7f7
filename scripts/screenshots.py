"""PNG screenshots of the web pages for the README (docs/*.png), taken with Playwright and
Debian's Chromium against ``sp2ot serve`` (embedded mode, a temporary data dir, the real engine)
on a generated archive of 90 shape images (3 kinds) with a ground-truth CSV.

    python scripts/screenshots.py            # writes docs/home.png, docs/job-running.png,
                                             # docs/result.png, docs/map.png
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from api_common import Server  # noqa: E402
from service_fixtures import (  # noqa: E402
    chromium_missing,
    image_set,
    launch_chromium,
    make_zip,
    service_env,
    truth_csv,
)

DOCS = REPO / "docs"


def main() -> int:
    reason = chromium_missing()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="sp2ot-shots-"))
    images = image_set(90, folder="shapes/")
    (work / "shapes.zip").write_bytes(make_zip(images))
    (work / "truth.csv").write_bytes(truth_csv(images))
    server = Server(service_env(data_dir=work / "data", estimator="sp2ot_engine:SP2OTClustering",
                                SP2OT_PROGRESS_INTERVAL="0.3"), work / "server.log").wait_ready()
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.goto(server.url + "/")
            page.set_input_files('input[name="archive"]', str(work / "shapes.zip"))
            page.fill('input[name="n_clusters"]', "3")
            page.click("details > summary")
            page.fill('input[name="epochs"]', "150")
            page.set_input_files('input[name="truth"]', str(work / "truth.csv"))
            page.screenshot(path=str(DOCS / "home.png"))
            page.click('button[type="submit"]')
            page.wait_for_url("**/ui/jobs/*", timeout=120_000)
            page.wait_for_function("() => document.querySelectorAll('#live-curve polyline').length === 2 &&"
                                   " document.querySelector('#live-curve polyline').points.length > 20",
                                   timeout=300_000)
            page.screenshot(path=str(DOCS / "job-running.png"))
            page.wait_for_selector("article.card", timeout=600_000)
            page.wait_for_function("() => Array.from(document.querySelectorAll('.cards img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(DOCS / "result.png"), full_page=True)
            page.click("text=Map")
            page.wait_for_function("() => document.querySelectorAll('#map-legend li').length > 0")
            time.sleep(0.5)
            box = page.locator("#map").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.screenshot(path=str(DOCS / "map.png"))
            browser.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("wrote", ", ".join(str(p.relative_to(REPO)) for p in sorted(DOCS.glob("*.png"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
