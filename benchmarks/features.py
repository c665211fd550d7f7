"""Feature-extraction throughput: is data loading the bottleneck?

Creates N synthetic 28x28 PNG images in a temp dir, scans them, then measures

- bare forward: ``backbone(x)`` on a ready-made normalised batch (B, 3, S, S), images/s;
- extract_features: the same backbone fed by ImageDataset + eval_transform through a
  DataLoader (PNG decode, upscale to S*256/224, centre crop, normalise, collate), images/s;
- their ratio (target >= 0.8).

The machine may be shared: bare forward and extraction are measured alternately ``--repeats``
times and the best of each is reported (the least-disturbed run), next to the median. CPU time
per image (this process plus finished DataLoader workers) is also printed: it is less sensitive
to other processes than wall time.

    python benchmarks/features.py --n 2000 --batch-size 64 --input-size 224
    python benchmarks/features.py --n 512 --batch-size 64 --sweep 96,128,160,224
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Must be set before torch (OpenMP) initialises. On a shared/busy machine, spinning OpenMP
# threads burn the CPU time their preempted partners need: PASSIVE measured 2-3x faster here.
# Override from the shell (OMP_WAIT_POLICY=ACTIVE python benchmarks/features.py ...) to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sp2ot_engine.backbones import create_backbone, extract_features  # noqa: E402
from sp2ot_engine.io.collection import scan_images  # noqa: E402
from sp2ot_engine.io.loader import ImageDataset  # noqa: E402
from sp2ot_engine.transforms import eval_transform  # noqa: E402


def make_images(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for i in range(n):
        cy, cx, r = rng.uniform(6, 22), rng.uniform(6, 22), rng.uniform(3, 10)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        img = np.where(blob, rng.integers(0, 256, 3), rng.integers(0, 256, 3)) + rng.normal(0, 12, (28, 28, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:06d}.png")


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def bare_forward(backbone, batch_size: int, size: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of ``backbone(x)`` on a ready batch."""
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        backbone(x)  # warm-up (oneDNN primitives for this shape)
        c, t = _cpu(), time.perf_counter()
        for _ in range(batches):
            backbone(x)
        dt, dc = time.perf_counter() - t, _cpu() - c
    n = batches * batch_size
    return n / dt, 1000 * dc / n


def extract(backbone, collection, batch_size: int, size: int, num_workers: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of extract_features over the whole collection."""
    ds = ImageDataset(collection, eval_transform(size, backbone.mean, backbone.std))
    with torch.inference_mode():  # warm-up: the full and the final partial batch shapes
        for b in {batch_size, len(ds) % batch_size} - {0}:
            backbone(torch.randn(b, 3, size, size))
    c, t = _cpu(), time.perf_counter()
    feats = extract_features(backbone, ds, batch_size=batch_size, num_workers=num_workers)
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert feats.shape == (len(ds), backbone.feature_dim)
    return len(ds) / dt, 1000 * dc / len(ds)


def load_only(collection, batch_size: int, size: int, mean, std) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the data path alone: decode, transform, collate (in-process)."""
    from sp2ot_engine.io.loader import make_loader, single_threaded

    ds = ImageDataset(collection, eval_transform(size, mean, std))
    loader = make_loader(ds, batch_size=batch_size)
    c, t = _cpu(), time.perf_counter()
    it = iter(loader)
    while True:
        with single_threaded():  # exactly as extract_features fetches batches
            if next(it, None) is None:
                break
    dt, dc = time.perf_counter() - t, _cpu() - c
    return len(ds) / dt, 1000 * dc / len(ds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of synthetic 28x28 images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--num-workers", type=int, default=0,
                    help="DataLoader decoding processes (0: in-process, best on 2 busy cores)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating measurements of each (best reported)")
    ap.add_argument("--bare-batches", type=int, default=None,
                    help="batches per bare-forward measurement (default: min(ceil(n/B), 8))")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sweep", default="", help="comma-separated input sizes to also measure, e.g. 96,128,160,224")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"loadavg={os.getloadavg()[0]:.2f} torch={torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sp2ot-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_images(root, args.n)
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        col = scan_images(root)
        t_scan = time.perf_counter() - t
        print(f"made {args.n} PNGs in {t_make:.1f}s; scan+verify {len(col)} images in {t_scan:.2f}s "
              f"({len(col) / t_scan:.0f} images/s)", flush=True)
        backbone = create_backbone(args.backbone)

        def measure(size: int):
            k = args.bare_batches or min(math.ceil(len(col) / args.batch_size), 8)
            bare, ext = [], []
            for _ in range(args.repeats):
                bare.append(bare_forward(backbone, args.batch_size, size, k))
                ext.append(extract(backbone, col, args.batch_size, size, args.num_workers))
            bare.append(bare_forward(backbone, args.batch_size, size, k))
            load = min((load_only(col, args.batch_size, size, backbone.mean, backbone.std)
                        for _ in range(args.repeats)), key=lambda r: r[1])
            return bare, ext, load

        def summary(rows):
            speeds = [r[0] for r in rows]
            return max(speeds), statistics.median(speeds), min(r[1] for r in rows)

        bare, ext, load = measure(args.input_size)
        (bb, bm, bc), (eb, em, ec) = summary(bare), summary(ext)
        print(f"backbone={args.backbone} n={len(col)} batch_size={args.batch_size} "
              f"input_size={args.input_size} num_workers={args.num_workers} repeats={args.repeats}")
        print(f"bare forward:     best {bb:7.1f} images/s  median {bm:7.1f}  cpu {bc:6.1f} ms/image")
        print(f"extract_features: best {eb:7.1f} images/s  median {em:7.1f}  cpu {ec:6.1f} ms/image")
        print(f"ratio (best/best): {eb / bb:.2f}  ratio (median/median): {em / bm:.2f}  "
              f"cpu-time ratio (bare/extract): {bc / ec:.2f}   target >= 0.80")
        print(f"runs (images/s): bare {[round(r[0], 1) for r in bare]}  extract {[round(r[0], 1) for r in ext]}")
        print(f"data path alone (decode+transform+collate, 1 thread): {load[0]:.0f} images/s, "
              f"{load[1]:.2f} CPU ms/image -> in-process ceiling bare_cpu/(bare_cpu+load_cpu) = "
              f"{bc / (bc + load[1]):.2f}")
        if args.sweep:
            print("\ninput_size  bare_best  bare_median  extract_best  extract_median  ratio_best  "
                  "ratio_median  bare_cpu_ms  extract_cpu_ms  load_cpu_ms  ceiling")
            for size in [int(s) for s in args.sweep.split(",") if s.strip()]:
                bare, ext, load = measure(size)
                (bb, bm, bc), (eb, em, ec) = summary(bare), summary(ext)
                print(f"{size:10d}  {bb:9.1f}  {bm:11.1f}  {eb:12.1f}  {em:14.1f}  {eb / bb:10.2f}  "
                      f"{em / bm:12.2f}  {bc:11.1f}  {ec:14.1f}  {load[1]:11.2f}  {bc / (bc + load[1]):7.2f}",
                      flush=True)
        print(f"loadavg at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
