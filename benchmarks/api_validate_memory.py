"""Memory of the API process while 5 uploads of 1,000 images each are validated at once.

Starts ``sp2ot serve`` on 127.0.0.1 in production mode (a throw-away PostgreSQL database, the
Celery queue on Redis; no worker, so the jobs stay queued), writes ``--uploads`` zips of
``--images`` generated PNGs each (``--size`` pixels square, noise: each archive different),
sends them to ``POST /jobs`` at the same time and samples the server's RSS every 10 ms.
Prints the baseline (after a warm-up upload), the peak while the uploads ran, the process's
high-water mark since it started (``VmHWM``), the answers, and whether torch was loaded into
the server (its libraries mapped in ``/proc/<pid>/maps``). Target: < 300 MB, no torch.

    python benchmarks/api_validate_memory.py
    python benchmarks/api_validate_memory.py --uploads 5 --images 1000 --size 128
"""
from __future__ import annotations

import argparse
import io
import sys
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import Sampler, rss_bytes, stack  # noqa: E402
from service_fixtures import image_set, make_zip  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MiB = 1024 * 1024
TARGET = 300e6


def write_archive(path: Path, n: int, size: int, seed: int) -> int:
    """A zip (stored: PNGs are compressed already) of ``n`` noise PNGs; its size in bytes."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
            zf.writestr(f"photos/{i:05d}.png", buf.getvalue())
    return path.stat().st_size


def torch_loaded(pid: int) -> bool:
    """Whether torch's shared libraries are mapped into the process (imported, in effect)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line or "/torch/lib/" in line for line in f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=5)
    ap.add_argument("--images", type=int, default=1000, help="PNGs per upload")
    ap.add_argument("--size", type=int, default=128, help="side of each PNG, pixels")
    ap.add_argument("--timeout", type=float, default=600, help="upper bound of one upload request, seconds")
    args = ap.parse_args()
    with stack("celery", "sp2ot_engine:SP2OTClustering", with_worker=False) as (server, env, workdir):
        t0 = time.perf_counter()
        archives = [workdir / f"upload_{i}.zip" for i in range(args.uploads)]
        total = sum(write_archive(a, args.images, args.size, seed=i) for i, a in enumerate(archives))
        print(f"{args.uploads} archives of {args.images} PNGs ({args.size} x {args.size}), {total / MiB:.0f} MiB "
              f"in all, written in {time.perf_counter() - t0:.1f} s; server {server.url} (PostgreSQL, Redis queue, "
              f"no worker)")
        pid = server.proc.pid
        with httpx.Client(base_url=server.url, timeout=args.timeout) as c:
            # Warm-up: every code path of an upload once (form parser, archive checks, queue).
            warm = c.post("/jobs", files={"archive": ("warm.zip", make_zip(image_set(10)), "application/zip")},
                          data={"n_clusters": "2"})
            warm.raise_for_status()
        time.sleep(1)
        baseline = rss_bytes(pid)
        sampler = Sampler(pid, period=0.01)
        sampler.start()
        answers: list[tuple[int, float, dict]] = [(0, 0.0, {})] * len(archives)

        def upload(i: int) -> None:
            t = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=args.timeout) as c, open(archives[i], "rb") as f:
                r = c.post("/jobs", files={"archive": (archives[i].name, f, "application/zip")},
                           data={"n_clusters": "10"})
            answers[i] = (r.status_code, time.perf_counter() - t, r.json())

        t0 = time.perf_counter()
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(archives))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        hwm = rss_bytes(pid, "VmHWM")
        after = rss_bytes(pid)
        with_torch = torch_loaded(pid)
    ok = all(status == 202 for status, _, _ in answers)
    for i, (status, seconds, body) in enumerate(answers):
        what = f"{body.get('n_images')} images, job {body.get('status')}" if status == 202 else body.get("detail")
        print(f"upload {i}: {status} in {seconds:.1f} s ({what})")
    print(f"{len(archives)} concurrent uploads in {wall:.1f} s")
    print(f"API RSS: baseline {baseline / MiB:.0f} MiB, peak during the uploads {peak / MiB:.0f} MiB "
          f"({sampler.samples} samples), after {after / MiB:.0f} MiB; high-water mark since start-up (VmHWM) "
          f"{hwm / MiB:.0f} MiB = {hwm / 1e6:.0f} MB")
    print(f"torch loaded in the API process: {'yes' if with_torch else 'no'}")
    met = ok and max(peak, hwm) < TARGET and not with_torch
    print(f"target: peak < 300 MB and no torch -> {'OK' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
