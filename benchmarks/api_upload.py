"""Memory of the API process while a large archive is uploaded.

Generates a ~1 GB zip on disk (stored, incompressible random blobs plus a few images),
starts ``sp2ot serve`` on 127.0.0.1 (embedded mode: SQLite, local files), uploads it to
``POST /datasets`` (the same streaming upload and archive checks as ``POST /jobs``, without
starting a job) and samples the server's RSS every 20 ms.
Prints the baseline (after a warm-up upload), the peak and the growth. Target: < 100 MB.

    python benchmarks/api_upload.py                 # 1 GiB
    python benchmarks/api_upload.py --size-mb 256   # quicker
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import Sampler, rss_bytes, stack  # noqa: E402
from service_fixtures import image_set, make_zip  # noqa: E402

import httpx  # noqa: E402

MiB = 1024 * 1024


def make_archive(path: Path, size_mb: int, blob_mb: int = 1) -> int:
    """Stored (uncompressed) zip: random blobs (not images: scanned, then skipped) + 30 images."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in image_set(30, folder="images/").items():
            zf.writestr(name, data)
        for i in range(size_mb // blob_mb):
            zf.writestr(f"blobs/blob_{i:05d}.bin", os.urandom(blob_mb * MiB))
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=900, help="upper bound of the upload request, seconds")
    args = ap.parse_args()
    extra = {"SP2OT_MAX_UPLOAD_BYTES": str((args.size_mb + 64) * MiB)}
    with stack("embedded", "sp2ot_engine:SP2OTClustering", **extra) as (server, env, workdir):
        archive = workdir / "big.zip"
        t0 = time.perf_counter()
        size = make_archive(archive, args.size_mb)
        print(f"archive {size / MiB:.0f} MiB generated in {time.perf_counter() - t0:.1f}s; server {server.url}")
        pid = server.proc.pid
        with httpx.Client(base_url=server.url, timeout=args.timeout) as c:
            # Warm-up: every code path of an upload once (parser, archive checks).
            r = c.post("/datasets", files={"archive": ("warm.zip", make_zip(image_set(10)), "application/zip")})
            r.raise_for_status()
            time.sleep(1)
            baseline = rss_bytes(pid)
            sampler = Sampler(pid)
            sampler.start()
            t0 = time.perf_counter()
            with open(archive, "rb") as f:
                r = c.post("/datasets", files={"archive": ("big.zip", f, "application/zip")})
            elapsed = time.perf_counter() - t0
            peak = sampler.stop()
        after = rss_bytes(pid)
        if r.status_code != 201:
            print(f"upload failed: {r.status_code} {r.text[:500]}")
            return 1
        ds = r.json()
        growth = (peak - baseline) / MiB
        print(f"uploaded {size / MiB:.0f} MiB in {elapsed:.1f}s ({size / MiB / elapsed:.0f} MiB/s incl. the "
              f"archive checks): {ds['n_images']} images, {ds['n_skipped']} files skipped")
        print(f"API RSS: baseline {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, after {after / MiB:.0f} MiB "
              f"({sampler.samples} samples)")
        print(f"RSS growth during the upload: {growth:.1f} MiB -> target < 100 MB: "
              f"{'OK' if growth * MiB < 100e6 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
