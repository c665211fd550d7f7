"""Latency of the web pages of a 50,000-image job: the result view and cluster pages.

Inserts a succeeded job of ``--n`` images (long-tailed cluster sizes, random confidences, a
thumbnail file pair, no real images: pages never read originals) directly into the database of
a real ``sp2ot serve`` on 127.0.0.1, then requests each page ``--requests`` times one after
the other over one keep-alive connection and prints p50 / p99 per page. Target: p99 < 300 ms.

    python benchmarks/ui_pages.py                    # PostgreSQL (+ Redis, as in production)
    python benchmarks/ui_pages.py --mode embedded    # SQLite
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import percentile, stack  # noqa: E402
from service_fixtures import settings_from  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402


def insert_job(env: dict[str, str], n: int, k: int, seed: int = 0) -> tuple[str, list[int]]:
    """A succeeded job of ``n`` images in ``k`` long-tailed clusters; returns its id and sizes."""
    from app import crud
    from app.core.db import Database, run_migrations
    from app.jobs import artifacts, repository
    from app.models import Job, new_id, utcnow
    from app.storage import Storage

    settings = settings_from(env)
    run_migrations(settings)
    db = Database(settings)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, k + 1) ** 1.2  # Zipf-like: a head of big clusters, a long tail
    labels = rng.choice(k, size=n, p=weights / weights.sum())
    conf = rng.beta(5, 2, size=n)
    names = [f"class_{int(c):03d}/img_{i:06d}.jpg" for i, c in enumerate(labels)]
    job_id = new_id()
    storage = Storage(settings)
    job_dir = storage.job_dir(job_id)
    job_dir.mkdir(parents=True)  # the pages read only the database and the thumbnails: no upload is stored
    sizes = np.bincount(labels, minlength=k).tolist()
    with db.session() as s:
        owner = crud.local_owner(s)
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner.id, input_path=storage.rel(job_dir / "upload.zip"), owns_input=True,
                  input_name="synthetic-50k", n_images=n, n_clusters=k, backbone="efficientnet_lite0", mode="fast",
                  epochs=30, formulation="sp2ot", seed=0, has_truth=False, input_skipped=[], status="succeeded",
                  attempts=1, progress={"stage": "done", "percent": 100.0}, created_at=now, started_at=now,
                  finished_at=now, summary={"n_images": n, "n_clusters": k, "cluster_sizes": sizes, "n_skipped": 0,
                                            "skipped": [], "artifacts": {"thumbnails": n, "map": "tsne"}},
                  history=[{"epoch": e, "loss": 1.0 / (e + 1), "rho": min(1.0, 0.1 + e / 30)} for e in range(30)]))
        s.flush()
        repository.bulk_insert_assignments(s, job_id, names, labels.tolist(), conf.tolist())
        s.commit()
    tiny = _tiny_jpeg()
    offsets = np.arange(n + 1, dtype="<u8") * len(tiny)
    (job_dir / artifacts.THUMBS_BIN).write_bytes(tiny * n)
    offsets.tofile(job_dir / artifacts.THUMBS_IDX)
    artifacts.write_map(rng.random((n, 2), dtype=np.float32), job_dir)
    db.dispose()
    return job_id, sizes


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (120, 140, 160)).save(buf, "JPEG", quality=75)
    return buf.getvalue()


def time_pages(base: str, pages: dict[str, str], requests: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with httpx.Client(base_url=base, timeout=30) as c:
        for label, url in pages.items():
            for _ in range(5):  # warm-up: connection, template compilation, query plans
                r = c.get(url)
                assert r.status_code == 200, (url, r.status_code, r.text[:300])
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                r = c.get(url)
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200
            out[label] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["celery", "embedded"], default="celery",
                    help="celery: PostgreSQL (+ Redis, a worker); embedded: SQLite")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    with stack(args.mode, "sp2ot_engine:SP2OTClustering") as (server, env, _workdir):
        t0 = time.perf_counter()
        job, sizes = insert_job(env, args.n, args.k)
        print(f"inserted a job of {args.n} images in {args.k} clusters in {time.perf_counter() - t0:.1f} s "
              f"(largest {max(sizes)}, smallest {min(sizes)}); database: "
              f"{'PostgreSQL' if args.mode == 'celery' else 'SQLite'}")
        big = int(np.argmax(sizes))
        small = int(np.argmin(sizes))
        last = (sizes[big] - 1) // 60 + 1
        pages = {
            "result view, page 1 (24 cluster cards)": f"/ui/jobs/{job}",
            "result view, last page of cards": f"/ui/jobs/{job}?page={(args.k - 1) // 24 + 1}",
            f"cluster page, largest ({sizes[big]} images), page 1": f"/ui/jobs/{job}/clusters/{big}",
            f"cluster page, largest, last page ({last})": f"/ui/jobs/{job}/clusters/{big}?page={last}",
            "cluster page, largest, least confident first": f"/ui/jobs/{job}/clusters/{big}?order=uncertain",
            f"cluster page, smallest ({sizes[small]} images)": f"/ui/jobs/{job}/clusters/{small}",
            "uncertain images, page 1": f"/ui/jobs/{job}/uncertain",
            "uncertain images, page 400": f"/ui/jobs/{job}/uncertain?page=400",
            "search by file name": f"/ui/jobs/{job}/search?q=img_0123",
            "map data (positions + clusters)": f"/ui/jobs/{job}/map.bin",
            "thumbnail": f"/ui/jobs/{job}/thumbs/12345.jpg",
        }
        # A curated job reads the same indexes plus its edits: time it after a merge too.
        results = time_pages(server.url, pages, args.requests)
        r = httpx.post(f"{server.url}/jobs/{job}/curation/merge", json={"clusters": [args.k - 1], "into": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        results.update({f"{k} (curated)": v for k, v in time_pages(
            server.url, {"result view, page 1 (24 cluster cards)": pages["result view, page 1 (24 cluster cards)"],
                         "cluster page, largest, page 1": pages[f"cluster page, largest ({sizes[big]} images), page 1"]},
            args.requests).items()})
    width = max(len(k) for k in results)
    print(f"{'page':<{width}}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  ({args.requests} sequential requests each)")
    for label, t in results.items():
        print(f"{label:<{width}}  {percentile(t, 50):7.1f}  {percentile(t, 99):7.1f}  {max(t):7.1f}")
    worst = max(percentile(t, 99) for t in results.values())
    print(f"worst p99: {worst:.1f} ms (target < 300 ms): {'met' if worst < 300 else 'MISSED'}")


if __name__ == "__main__":
    main()
