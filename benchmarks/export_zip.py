"""Memory of the API process while it streams the zip export of a large job.

Stores ``--size-mb`` of incompressible images (``--files`` JPEGs: a small valid JPEG padded
with random bytes after its end, so they pass the archive rules without costing an encoder) as
a job's upload, the way the API stores one (``upload.zip`` and its manifest, under a temporary
data dir), inserts a succeeded job of them (10 clusters) into its database, starts ``sp2ot
serve`` on 127.0.0.1 (embedded mode), downloads
``GET /jobs/{id}/export?format=zip`` (throwing the bytes away) and samples the server's RSS every
20 ms. Prints the baseline (after a warm-up export of a small job), the peak and the growth.
Target: < 100 MB for a 1 GB job. Nothing is kept: the data is deleted afterwards.

    python benchmarks/export_zip.py                  # 1 GiB
    python benchmarks/export_zip.py --size-mb 128    # quicker
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import rss_bytes, stack  # noqa: E402
from service_fixtures import settings_from  # noqa: E402

import httpx  # noqa: E402

MiB = 1024 * 1024


def insert_job(env: dict[str, str], files: int, size: int) -> str:
    from app import crud
    from app.core.db import Database
    from app.jobs import repository
    from app.models import Job, new_id, utcnow
    from app.storage import Storage
    from PIL import Image
    from sp2ot_engine.io.archive import inspect_archive, manifest_path

    settings = settings_from(env)
    db = Database(settings)
    storage = Storage(settings)
    job_id = new_id()
    storage.job_dir(job_id).mkdir(parents=True)
    upload = storage.job_dir(job_id) / "upload.zip"
    head = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 200)).save(head, "JPEG")
    block = os.urandom(size)
    names = []
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as zf:
        for i in range(files):
            name = f"photo_{i:05d}.jpg"
            data = head.getvalue() + block[i % 97:] + block[:i % 97]  # distinct files, no time on randomness
            zf.writestr(name, data[:size])
            names.append(name)
    inspect_archive(upload).write(manifest_path(upload))  # as the API writes it when it checks an upload
    with db.session() as s:
        owner = crud.local_owner(s)
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner.id, input_path=storage.rel(upload), owns_input=True, input_name="big",
                  n_images=files, n_clusters=10, backbone="efficientnet_lite0", mode="fast", formulation="sp2ot",
                  seed=0, has_truth=False, input_skipped=[], status="succeeded", attempts=1, progress={},
                  created_at=now, finished_at=now, summary={"n_images": files, "n_clusters": 10}))
        s.flush()
        repository.bulk_insert_assignments(s, job_id, names, [i % 10 for i in range(files)], [0.5] * files)
        s.commit()
    db.dispose()
    return job_id


def download(url: str) -> int:
    n = 0
    with httpx.stream("GET", url, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            n += len(chunk)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=1024)
    args = ap.parse_args()
    per_file = args.size_mb * MiB // args.files
    with stack("embedded", "sp2ot_engine:SP2OTClustering") as (server, env, _workdir):
        small = insert_job(env, 20, 64 * 1024)
        big = insert_job(env, args.files, per_file)
        download(f"{server.url}/jobs/{small}/export?format=zip")  # warm-up: imports, first allocations
        time.sleep(0.5)
        pid = server.proc.pid
        base = rss_bytes(pid)
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        n = download(f"{server.url}/jobs/{big}/export?format=zip")
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    print(f"zip export of a job of {args.files} files, {args.size_mb} MiB in all: {n / MiB:.0f} MiB streamed in "
          f"{seconds:.1f} s ({n / MiB / seconds:.0f} MiB/s)")
    print(f"server RSS: baseline {base / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, growth {(peak - base) / MiB:.1f} MiB "
          f"(target < 100 MB): {'met' if peak - base < 100e6 else 'MISSED'}")


if __name__ == "__main__":
    main()
