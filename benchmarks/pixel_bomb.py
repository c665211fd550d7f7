"""A pixel bomb against a real ``sp2ot serve``: request time and server memory.

Builds ``--images`` PNGs of ``--side`` x ``--side`` black pixels (default 10 x 9,400 x 9,400 =
10 x 88 Mpx) in a zip of about 10 KB in a temporary folder, starts ``sp2ot serve`` on
127.0.0.1 in the embedded mode (SQLite, the worker threads in the API process, the real
engine: an accepted bomb is decoded in the very process measured), posts the zip to
``POST /jobs`` and samples the server's RSS every 20 ms during the request and for
``--after`` seconds more (the embedded worker would decode an accepted upload then).
Prints the answer, the request time and the RSS growth over the idle server. Targets:
< 3 s, < 300 MB.

    python benchmarks/pixel_bomb.py
    python benchmarks/pixel_bomb.py --env SP2OT_MAX_IMAGE_PIXELS=178956970   # Pillow's limit, as before
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import Sampler, rss_bytes, stack  # noqa: E402

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

MB = 1e6
TARGET_SECONDS = 3.0
TARGET_BYTES = 300e6


def write_bomb(path: Path, n: int, side: int) -> int:
    """A zip of ``n`` copies of one black ``side`` x ``side`` PNG; its size in bytes."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    png = buf.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for i in range(n):
            zf.writestr(f"photo_{i:02d}.png", png)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--side", type=int, default=9400)
    p.add_argument("--after", type=float, default=10.0, help="seconds of RSS sampling after the answer")
    p.add_argument("--env", action="append", default=[], metavar="SP2OT_X=VALUE", help="extra server setting")
    args = p.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)

    with tempfile.TemporaryDirectory(prefix="sp2ot-bomb-") as tmp:
        bomb = Path(tmp) / "bomb.zip"
        size = write_bomb(bomb, args.images, args.side)
        mpx = args.images * args.side * args.side / MB
        print(f"bomb: {args.images} PNGs of {args.side} x {args.side} ({mpx:.0f} Mpx in total) in a zip of "
              f"{size / 1000:.1f} KB")
        with stack("embedded", "sp2ot_engine:SP2OTClustering", **extra) as (server, _env, _workdir):
            pid = server.proc.pid
            with httpx.Client(base_url=server.url, timeout=300) as client:
                client.get("/health")  # warm: the first request loads what every request needs
                time.sleep(1.0)
                idle = rss_bytes(pid)
                sampler = Sampler(pid)
                sampler.start()
                t0 = time.perf_counter()
                with bomb.open("rb") as f:
                    r = client.post("/jobs", files={"archive": ("bomb.zip", f, "application/zip")},
                                    data={"n_clusters": "2"})
                elapsed = time.perf_counter() - t0
                time.sleep(args.after)
                if r.status_code == 202:  # accepted: stop the decoding it started
                    client.delete(f"/jobs/{r.json()['id']}")
                peak = sampler.stop()
    growth = peak - idle
    print(f"answer: {r.status_code} {r.text[:300]}")
    print(f"request time: {elapsed:.2f} s (target < {TARGET_SECONDS:.0f} s)")
    print(f"server RSS: idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB within {args.after:.0f} s after the "
          f"answer, growth {growth / MB:.0f} MB (target < {TARGET_BYTES / MB:.0f} MB)")
    ok = elapsed < TARGET_SECONDS and growth < TARGET_BYTES
    print("targets met" if ok else "targets MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
