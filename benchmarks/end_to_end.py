"""End-to-end speed of fast mode: N small images on disk -> labels (decode, features, graph,
training, labels), with the time of every stage.

    python benchmarks/end_to_end.py                         # 10,000 Fashion-MNIST 28x28 PNGs, input 224
    python benchmarks/end_to_end.py --input-size 96 --epochs 10

The images are the first N of Debian's Fashion-MNIST test+train files written as PNG files in a
temporary folder (not timed). Prints seconds per stage, the total, and ACC against the labels.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--formulation", default=None, help="default: the estimator's")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    from sp2ot_engine import SP2OTClustering
    from datasets import fashion_mnist_lt
    from sp2ot_engine.metrics import evaluate

    train, test = fashion_mnist_lt()
    images = np.concatenate([test.images, train.images])[: args.n]
    labels = np.concatenate([test.labels, train.labels])[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(images):
            Image.fromarray(img).save(Path(tmp) / f"{i:06d}.png")
        stages: dict[str, float] = {}
        last = {"stage": None, "t": time.perf_counter()}

        def progress(info: dict) -> None:
            now = time.perf_counter()
            if info["stage"] != last["stage"]:
                if last["stage"] is not None:
                    stages[last["stage"]] = stages.get(last["stage"], 0.0) + now - last["t"]
                last.update(stage=info["stage"], t=now)

        t0 = time.perf_counter()
        extra = {"formulation": args.formulation} if args.formulation else {}
        est = SP2OTClustering(10, mode="fast", input_size=args.input_size, epochs=args.epochs, device="cpu", **extra)
        est.fit(tmp, progress=progress)
        total = time.perf_counter() - t0
    m = evaluate(labels[[int(Path(f).stem) for f in est.filenames_]], est.labels_)
    print(f"{args.n} images of 28x28, input {args.input_size or 'default'}, epochs {args.epochs or 'default'}, "
          f"formulation {est.formulation}, init {est.init} (start kept: {est.start_}), {torch.get_num_threads()} threads")
    for stage, secs in stages.items():
        print(f"  {stage:11s} {secs:7.1f} s")
    print(f"  total       {total:7.1f} s   (target < 300 s)   ACC {100 * m['acc']:.1f}  NMI {100 * m['nmi']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
