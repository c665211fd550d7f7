"""Assigning new images to a fitted model vs extracting their features alone (issue 11 target:
assign within 1.2x the feature extraction of the same images with the same backbone).

1. Fits a model on ``--n-fit`` Fashion-MNIST training images (fast mode, ``--epochs``) and saves
   it (``SP2OTClustering.save``, what the worker keeps as a job's ``model.pt``).
2. Writes ``--n`` new 28x28 images (the Fashion-MNIST test set; generated noise images with
   ``--generated`` or when the data set is not installed) as PNG files to a folder.
3. Times, alternately ``--repeats`` times (the machine may be shared: best and median are
   printed):

   * **features alone**: what any use of the backbone on these images costs in the engine:
     build the backbone, scan the folder (every image decoded once to verify it), extract the
     features (``extract_features``, eval transform, batch 64);
   * **assign**: ``SP2OTClustering.load(model).predict_assignments(folder)``, i.e. the same plus
     loading the model file, the head's logits and the confidences (what ``sp2ot assign`` and
     an assign request of the service run).

    python benchmarks/assign_speed.py                      # 1,000 images, 3 repeats
    python benchmarks/assign_speed.py --n 1000 --repeats 5 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sp2ot_engine import SP2OTClustering  # noqa: E402
from sp2ot_engine.backbones import create_backbone, extract_features, resolve_device  # noqa: E402
from sp2ot_engine.io.collection import scan_images  # noqa: E402
from sp2ot_engine.io.loader import ImageDataset  # noqa: E402
from sp2ot_engine.transforms import eval_transform  # noqa: E402


def fashion_images(n_fit: int, n_new: int, generated: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``(fit images, new images, source)``: uint8 ``N x 28 x 28``."""
    if not generated:
        try:
            from benchmarks.datasets import fashion_mnist_lt

            train, test = fashion_mnist_lt(imbalance=1)
            return train.images[:n_fit], test.images[:n_new], "Fashion-MNIST (train / t10k)"
        except ValueError as e:
            print(f"Fashion-MNIST not available ({e}); using generated images", file=sys.stderr)
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n_fit, 28, 28), dtype=np.uint8),
            rng.integers(0, 256, (n_new, 28, 28), dtype=np.uint8), "generated noise")


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img_{i:05d}.png")
    return folder


def features_alone(folder: Path, backbone: str, device: torch.device) -> float:
    t0 = time.perf_counter()
    bb = create_backbone(backbone, device=device)
    bb.freeze_all()
    collection = scan_images(folder)
    try:
        dataset = ImageDataset(collection, eval_transform(bb.input_size, bb.mean, bb.std))
        features = extract_features(bb, dataset, batch_size=64 if device.type == "cpu" else 256, device=device)
    finally:
        collection.close()
    assert features.shape[0] == len(collection)
    return time.perf_counter() - t0


def assign(model: Path, folder: Path, n: int) -> float:
    t0 = time.perf_counter()
    result = SP2OTClustering.load(model).predict_assignments(str(folder))
    assert len(result.names) == n
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="new images assigned (default 1000)")
    ap.add_argument("--n-fit", type=int, default=500, help="images the model is fitted on (default 500)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--generated", action="store_true", help="generated images instead of Fashion-MNIST")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    fit_images, new_images, source = fashion_images(args.n_fit, args.n, args.generated)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fit_dir = write_pngs(fit_images, tmp / "fit")
        new_dir = write_pngs(new_images, tmp / "new")
        model = tmp / "model.pt"
        t0 = time.perf_counter()
        SP2OTClustering(10, backbone=args.backbone, epochs=args.epochs, device=str(device)).fit(str(fit_dir)).save(model)
        print(f"{source}: model fitted on {len(fit_images)} images in {time.perf_counter() - t0:.1f} s "
              f"({model.stat().st_size / 1024:.0f} KiB), {args.backbone} on {device}, "
              f"{torch.get_num_threads()} torch threads")
        features_alone(new_dir, args.backbone, device)  # warm-up: file cache, weights, allocator
        alone, assigned = [], []
        for _ in range(args.repeats):
            alone.append(features_alone(new_dir, args.backbone, device))
            assigned.append(assign(model, new_dir, len(new_images)))
    print(f"{len(new_images)} new 28x28 images, {args.repeats} alternate runs each")
    print(f"features alone : best {min(alone):6.2f} s  median {statistics.median(alone):6.2f} s  "
          f"({len(new_images) / min(alone):.0f} images/s)")
    print(f"assign         : best {min(assigned):6.2f} s  median {statistics.median(assigned):6.2f} s")
    print(f"ratio assign / features alone: best {min(assigned) / min(alone):.3f}  "
          f"median {statistics.median(assigned) / statistics.median(alone):.3f}  (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
