"""Cost of the worker's thumbnails against the job's feature extraction.

Generates ``--n`` photo-like JPEGs (``--width`` x ``--height``: gradients, shapes and noise, so
they compress like photographs) and, with ``--png``, as many PNGs; then, on the same files:

* feature extraction as a job does it (``efficientnet_lite0`` on the CPU: decode, resize to 224,
  forward; batches of 64, torch's default threads), wall and CPU seconds;
* ``app.jobs.artifacts.make_thumbnails`` (decode at reduced scale, 128 px JPEG, thread pool),
  wall and CPU seconds.

Prints per-image milliseconds, the ratio (target: thumbnails < 10% of feature extraction) and
the extrapolation to 50,000 images (both are linear in the number of images).

    python benchmarks/thumbnails.py --n 1000
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_images(folder: Path, n: int, size: tuple[int, int], fmt: str, seed: int = 0) -> list[str]:
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    names = []
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = (xx * rng.uniform(0.3, 1) + yy * rng.uniform(0.3, 1)) / (w + h)
        arr = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None])
        arr += rng.normal(0, 12, arr.shape)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse((x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))),
                      fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        im = im.filter(ImageFilter.GaussianBlur(0.8))
        name = f"img_{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        im.save(folder / name, fmt, **({"quality": 88} if fmt == "JPEG" else {}))
        names.append(name)
    return names


def time_features(folder: Path) -> tuple[float, float, int]:
    import torch

    from sp2ot_engine.backbones import create_backbone, extract_features
    from sp2ot_engine.io.collection import scan_images
    from sp2ot_engine.io.loader import ImageDataset
    from sp2ot_engine.transforms import eval_transform

    coll = scan_images(str(folder))
    bb = create_backbone("efficientnet_lite0", device=torch.device("cpu"))
    bb.freeze_all()
    ds = ImageDataset(coll, eval_transform(bb.input_size, bb.mean, bb.std))
    extract_features(bb, torch.utils.data.Subset(ds, range(min(64, len(ds)))), batch_size=64, device="cpu")  # warm
    w0, c0 = time.perf_counter(), cpu_seconds()
    feats = extract_features(bb, ds, batch_size=64, num_workers=0, device="cpu")
    return time.perf_counter() - w0, cpu_seconds() - c0, int(feats.shape[0])


def time_thumbnails(folder: Path, names: list[str], out: Path) -> tuple[float, float, int, int]:
    from app.jobs import artifacts

    w0, c0 = time.perf_counter(), cpu_seconds()
    made = artifacts.make_thumbnails(folder, names, out)
    return time.perf_counter() - w0, cpu_seconds() - c0, made, (out / artifacts.THUMBS_BIN).stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--png", action="store_true", help="also PNGs of the same size")
    args = ap.parse_args()
    import torch

    print(f"{args.n} images of {args.width} x {args.height}; {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}")
    for fmt in ("JPEG", "PNG") if args.png else ("JPEG",):
        with tempfile.TemporaryDirectory(prefix="sp2ot-thumbs-") as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            names = make_images(folder, args.n, (args.width, args.height), fmt)
            mb = sum((folder / n).stat().st_size for n in names) / 2**20
            fw, fc, nf = time_features(folder)
            tw, tc, made, size = time_thumbnails(folder, names, Path(tmp) / "job")
            assert nf == made == args.n
            print(f"\n{fmt}: {mb:.0f} MB of originals")
            print(f"  feature extraction: {fw:7.1f} s wall {fc:7.1f} s CPU  = {1000 * fw / args.n:6.2f} ms/image wall, "
                  f"{1000 * fc / args.n:6.2f} ms CPU")
            print(f"  thumbnails:         {tw:7.1f} s wall {tc:7.1f} s CPU  = {1000 * tw / args.n:6.2f} ms/image wall, "
                  f"{1000 * tc / args.n:6.2f} ms CPU; {size / args.n / 1024:.1f} KiB per thumbnail")
            print(f"  thumbnails / feature extraction: {100 * tw / fw:.1f}% of the wall time, "
                  f"{100 * tc / fc:.1f}% of the CPU time (target < 10%)")
            print(f"  at 50,000 images: features ~{50_000 * fw / args.n / 60:.0f} min, thumbnails "
                  f"~{50_000 * tw / args.n:.0f} s ({50_000 * size / args.n / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
