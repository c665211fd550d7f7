"""Quality benchmark on Fashion-MNIST-LT (imbalance 100): the paper's Table IV rows on the same
backbone features, plus k-means and spectral clustering as classical references.

    python benchmarks/quality.py                                   # 3 seeds, all rows, input 224
    python benchmarks/quality.py --seeds 0 --rows kmeans,sp2ot     # a quick look
    python benchmarks/quality.py --input-sizes 96,128,224 --rows kmeans,sp2ot --seeds 0   # resolution study
    python benchmarks/quality.py --backgrounds white,black --rows kmeans --seeds 0         # transparency study

Needs Debian's `dataset-fashion-mnist` (`bash scripts/install_fashion_mnist.sh`). Backbone
features are computed once per (input size, background) and cached in `benchmarks/.cache/`.
Train = the imbalanced training set (transductive), test = the balanced official test set
(inductive: the fitted model assigns the unseen images). Prints one row per method with the
mean over seeds of ACC / NMI / F1 / Head / Medium / Tail (percent) and the wall time of the fit;
`--markdown FILE` also writes the table.

The transparency study turns each grey image into an RGBA image (the item opaque, the
background transparent, as icons and cut-outs are uploaded) and flattens it onto the given
background colour before the backbone sees it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached_features  # noqa: E402

ROWS = ("kmeans", "spectral", "ot", "uot", "pot", "p2ot", "sp2ot")
METRICS = ("acc", "nmi", "f1", "head_acc", "medium_acc", "tail_acc")


def as_rgba_cutouts(images: np.ndarray) -> np.ndarray:
    """Grey items on a transparent background: RGB = a dark blue ink, alpha = intensity."""
    alpha = images.astype(np.uint8)
    rgb = np.zeros(images.shape + (3,), dtype=np.uint8)
    rgb[..., 2] = 128
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def fit_predict(row: str, x_train: np.ndarray, x_test: np.ndarray, k: int, seed: int, epochs: int, mode: str):
    """Train labels, test labels and fit seconds for one method."""
    import faiss

    t = time.perf_counter()
    if row == "kmeans":
        km = faiss.Kmeans(x_train.shape[1], k, niter=50, nredo=5, seed=seed)
        km.train(x_train)
        train = km.index.search(x_train, 1)[1].ravel()
        return train, km.index.search(x_test, 1)[1].ravel(), time.perf_counter() - t
    if row == "spectral":
        from sklearn.cluster import SpectralClustering
        from sklearn.neighbors import KNeighborsClassifier

        sc = SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=20, assign_labels="cluster_qr",
                                random_state=seed, n_jobs=1)
        train = sc.fit_predict(x_train)
        test = KNeighborsClassifier(20).fit(x_train, train).predict(x_test)
        return train, test, time.perf_counter() - t
    from sp2ot_engine import SP2OTClustering

    est = SP2OTClustering(k, formulation=row, epochs=epochs, mode=mode, seed=seed, device="cpu")
    train = est.fit(x_train).labels_
    return train, est.predict(x_test), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--input-sizes", default="224")
    ap.add_argument("--backgrounds", default="", help="comma list: run the transparency study instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from sp2ot_engine.datasets import fashion_mnist_lt
    from sp2ot_engine.metrics import evaluate

    train, test = fashion_mnist_lt()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    settings = [(int(s), "white", False) for s in args.input_sizes.split(",")]
    if args.backgrounds:
        settings = [(int(args.input_sizes.split(",")[0]), bg, True) for bg in args.backgrounds.split(",")]

    lines = [f"Fashion-MNIST-LT: train {len(train)} images (imbalance {train.imbalance_ratio():.0f}), "
             f"test {len(test)} (balanced); fast mode, {args.epochs} epochs; seeds {args.seeds}",
             "", "| input | background | method | split | ACC | NMI | F1 | Head | Medium | Tail | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for size, bg, rgba in settings:
        tr_img, te_img = (as_rgba_cutouts(train.images), as_rgba_cutouts(test.images)) if rgba else \
            (train.images, test.images)
        tag = "rgba" if rgba else "gray"
        x_tr = cached_features(f"fmnist-lt-train{'-rgba' if rgba else ''}", tr_img, input_size=size, background=bg)
        x_te = cached_features(f"fmnist-test{'-rgba' if rgba else ''}", te_img, input_size=size, background=bg)
        for row in rows:
            res = {"train": [], "test": []}
            secs = []
            for seed in args.seeds:
                lab_tr, lab_te, s = fit_predict(row, x_tr, x_te, 10, seed, args.epochs, "fast")
                res["train"].append(evaluate(train.labels, lab_tr))
                res["test"].append(evaluate(test.labels, lab_te))
                secs.append(s)
            for split in ("train", "test"):
                mean = {m: 100 * np.mean([r[m] for r in res[split]]) for m in METRICS}
                line = (f"| {size} | {bg if rgba else '-'} ({tag}) | {row} | {split} | "
                        + " | ".join(f"{mean[m]:.1f}" for m in METRICS) + f" | {np.mean(secs):.0f} |")
                lines.append(line)
                print(line, flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
