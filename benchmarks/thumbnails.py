"""Cost of the worker's thumbnails against the job's feature extraction.

Generates ``--n`` photo-like JPEGs (``--width`` x ``--height``: gradients, shapes and noise, so
they compress like photographs) and, with ``--png``, as many PNGs, stored as a job's upload is
(a zip and its manifest); then, on the same files, as a job does it:

* reading the images: ``ImageCollection.from_manifest(..., verify=True)``, which decodes every
  image once (damaged pixel data is skipped), without and with the thumbnails made from those
  decoded images (``app.jobs.artifacts.Thumbnails`` as its ``on_decoded`` hook, then
  ``Thumbnails.write``); the difference is what the thumbnails cost;
* for comparison, thumbnails made by decoding every original again (what the worker did before
  the hook: read, decode at reduced scale, 128 px JPEG, in a thread pool);
* feature extraction (``efficientnet_lite0`` on the CPU: decode, resize to 224, forward; batches
  of 64, torch's default threads).

Each timed pass runs twice, the faster counted. Prints per-image milliseconds, the ratio of the
thumbnails to the feature extraction (target < 10%) and the extrapolation to 50,000 images
(both are linear in the number of images).

    python benchmarks/thumbnails.py --n 1000 --png
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
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


def store_upload(folder: Path, names: list[str], out: Path) -> Path:
    """The images as a stored upload: a zip and its manifest, as the API stores them."""
    from sp2ot_engine.io.archive import inspect_archive, manifest_path

    upload = out / "upload.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            zf.write(folder / name, name)
    inspect_archive(upload).write(manifest_path(upload))
    return upload


def best_of_two(fn):
    """``fn() -> (wall, cpu, *rest)`` run twice; the faster run."""
    return min((fn() for _ in range(2)), key=lambda r: r[0])


def time_reading(upload: Path, job_dir: Path | None) -> tuple[float, float, int, int]:
    """The job's reading pass (every image decoded once), with thumbnails when ``job_dir``."""
    from app.jobs import artifacts
    from app.storage import open_stored

    w0, c0 = time.perf_counter(), cpu_seconds()
    if job_dir is None:
        with open_stored(upload, verify=True) as images:
            n = len(images)
        return time.perf_counter() - w0, cpu_seconds() - c0, n, 0
    with artifacts.Thumbnails(job_dir) as thumbs:
        with open_stored(upload, verify=True, on_decoded=thumbs) as images:
            made = thumbs.write(images.names)
    return time.perf_counter() - w0, cpu_seconds() - c0, made, (job_dir / artifacts.THUMBS_BIN).stat().st_size


def time_second_decode(upload: Path) -> tuple[float, float, int]:
    """Thumbnails from a second decode of every original (the worker's way before the hook)."""
    from app.jobs import artifacts
    from app.storage import open_stored
    from sp2ot_engine.io.decode import decode_image

    with open_stored(upload) as images:
        def one(i: int) -> bytes:
            return artifacts.thumbnail_of(decode_image(images.read_bytes(i), min_side=artifacts.THUMB_SIZE))

        w0, c0 = time.perf_counter(), cpu_seconds()
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            made = sum(1 for data in pool.map(one, range(len(images)), chunksize=16) if data)
    return time.perf_counter() - w0, cpu_seconds() - c0, made


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

    def ms(seconds: float) -> str:
        return f"{1000 * seconds / args.n:6.2f}"

    for fmt in ("JPEG", "PNG") if args.png else ("JPEG",):
        with tempfile.TemporaryDirectory(prefix="sp2ot-thumbs-") as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            names = make_images(folder, args.n, (args.width, args.height), fmt)
            mb = sum((folder / n).stat().st_size for n in names) / 2**20
            upload = store_upload(folder, names, Path(tmp))
            rw, rc, nr, _ = best_of_two(lambda: time_reading(upload, None))
            jobs = iter(range(2))
            tw, tc, made, size = best_of_two(lambda: time_reading(upload, Path(tmp) / f"job{next(jobs)}"))
            sw, sc, second = best_of_two(lambda: time_second_decode(upload))
            fw, fc, nf = time_features(folder)
            assert nr == nf == made == second == args.n
            dw, dc = max(0.0, tw - rw), max(0.0, tc - rc)
            print(f"\n{fmt}: {mb:.0f} MB of originals")
            print(f"  reading (each image decoded once): {rw:6.1f} s wall {rc:6.1f} s CPU = {ms(rw)} ms/image wall, "
                  f"{ms(rc)} ms CPU")
            print(f"  the same with thumbnails:          {tw:6.1f} s wall {tc:6.1f} s CPU = {ms(tw)} ms/image wall, "
                  f"{ms(tc)} ms CPU; {size / args.n / 1024:.1f} KiB per thumbnail")
            print(f"  thumbnails (the difference):       {dw:6.1f} s wall {dc:6.1f} s CPU = {ms(dw)} ms/image wall, "
                  f"{ms(dc)} ms CPU")
            print(f"  thumbnails by a second decode:     {sw:6.1f} s wall {sc:6.1f} s CPU = {ms(sw)} ms/image wall, "
                  f"{ms(sc)} ms CPU")
            print(f"  feature extraction:                {fw:6.1f} s wall {fc:6.1f} s CPU = {ms(fw)} ms/image wall, "
                  f"{ms(fc)} ms CPU")
            print(f"  thumbnails / feature extraction: {100 * dw / fw:.1f}% of the wall time, {100 * dc / fc:.1f}% of "
                  f"the CPU time (target < 10%); by a second decode: {100 * sw / fw:.1f}% wall, {100 * sc / fc:.1f}% CPU")
            print(f"  at 50,000 images: features ~{50_000 * fw / args.n / 60:.0f} min, thumbnails "
                  f"~{50_000 * dw / args.n:.0f} s ({50_000 * size / args.n / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
