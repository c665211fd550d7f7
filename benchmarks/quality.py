"""Quality benchmark on Fashion-MNIST-LT (imbalance 100): the paper's Table IV rows on the same
backbone features, plus k-means and spectral clustering as classical references.

    python benchmarks/quality.py                                   # 3 seeds, all rows, input 224
    python benchmarks/quality.py --seeds 0 --rows kmeans,sp2ot     # a quick look
    python benchmarks/quality.py --input-sizes 96,128,224 --rows kmeans,sp2ot --seeds 0   # resolution study
    python benchmarks/quality.py --backgrounds white,black --rows kmeans --seeds 0         # transparency study
    python benchmarks/quality.py --modes fast,full --rows kmeans,sp2ot --seeds 0 --input-sizes 96 --full-epochs 2

Needs Debian's `dataset-fashion-mnist` (`bash scripts/install_fashion_mnist.sh`). Backbone
features are computed once per (input size, background) and cached in `benchmarks/.cache/`.

Modes (`--modes`): `fast` trains the head on those cached features (every row). `full` is the
paper's training, the backbone's last block fine-tuned on two augmented views of the images: the
images are written as PNG files to a temporary folder (not timed) and the estimator is given the
folder, so its fit time includes its own feature extraction (initial features for the graph, and
the fine-tuned features the labels come from) and assigning the test folder. Only the OT rows
have a full mode; k-means and spectral run on the features whatever the modes. `--full-epochs`
sets the full-mode epochs (default `--epochs`): full mode costs a backbone forward per view per
step, far more than fast mode on a CPU.
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
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached_features  # noqa: E402
from sp2ot_engine.options import INITS  # noqa: E402

ROWS = ("kmeans", "spectral", "ot", "uot", "pot", "p2ot", "sp2ot")
METRICS = ("acc", "nmi", "f1", "head_acc", "medium_acc", "tail_acc")


def as_rgba_cutouts(images: np.ndarray) -> np.ndarray:
    """Grey items on a transparent background: RGB = a dark blue ink, alpha = intensity."""
    alpha = images.astype(np.uint8)
    rgb = np.zeros(images.shape + (3,), dtype=np.uint8)
    rgb[..., 2] = 128
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def fit_predict(row: str, x_train: np.ndarray, x_test: np.ndarray, k: int, seed: int, epochs: int, mode: str,
                init: str = "auto", **image_options):
    """Train labels, test labels and fit seconds for one method.

    Fast mode (and k-means, spectral) take feature matrices. Full mode takes image folders
    (``x_train``, ``x_test`` are their paths, files ``<index>.png``) and ``image_options``
    for the estimator (``input_size``, ``background``, ``num_workers``).
    """
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

    est = SP2OTClustering(k, formulation=row, epochs=epochs, mode=mode, init=init, random_state=seed, device="cpu",
                          **image_options)
    if mode == "fast":
        train = est.fit(x_train).labels_
        return train, est.predict(x_test), time.perf_counter() - t
    est.fit(x_train)
    test_names, test = est.predict_images(x_test)
    return (in_index_order(est.filenames_, est.labels_), in_index_order(test_names, test),
            time.perf_counter() - t)


def in_index_order(names, labels) -> np.ndarray:
    """Labels of the files ``<index>.png`` rearranged by index."""
    out = np.empty(len(names), dtype=np.int64)
    out[[int(Path(n).stem) for n in names]] = labels
    return out


def write_pngs(ds, images: np.ndarray, folder: Path) -> Path:
    """``images`` (with ``ds``'s labels) as PNG files ``<index>.png``, whose sorted names are index order."""
    from datasets import LabelledImages, write_image_folder

    return write_image_folder(LabelledImages(images, ds.labels, ds.class_names), folder)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--modes", default="fast", help="comma list of fast, full (default fast)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--full-epochs", type=int, default=None, help="full-mode epochs (default --epochs)")
    ap.add_argument("--init", default="auto", choices=INITS, help="cluster-head start")
    ap.add_argument("--workers", type=int, default=0, help="full mode: image-decoding worker processes")
    ap.add_argument("--input-sizes", default="224")
    ap.add_argument("--backgrounds", default="", help="comma list: run the transparency study instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from datasets import fashion_mnist_lt
    from sp2ot_engine.metrics import evaluate

    train, test = fashion_mnist_lt()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"fast", "full"}:
        ap.error(f"--modes: a comma list of fast, full; got {args.modes!r}")
    full_epochs = args.full_epochs or args.epochs
    runs = [(row, mode) for mode in modes for row in rows if mode == "fast" or row not in ("kmeans", "spectral")]
    if "fast" not in modes:  # k-means / spectral have no modes: run them on the features anyway
        runs = [(row, "fast") for row in rows if row in ("kmeans", "spectral")] + runs
    settings = [(int(s), "white", False) for s in args.input_sizes.split(",")]
    if args.backgrounds:
        settings = [(int(args.input_sizes.split(",")[0]), bg, True) for bg in args.backgrounds.split(",")]

    lines = [f"Fashion-MNIST-LT: train {len(train)} images (imbalance {train.imbalance_ratio():.0f}), "
             f"test {len(test)} (balanced); modes {','.join(modes)}; epochs fast {args.epochs}"
             + (f", full {full_epochs}" if "full" in modes else "") + f"; init {args.init}; seeds {args.seeds}",
             "", "| input | background | method | mode | epochs | split | ACC | NMI | F1 | Head | Medium | Tail | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for size, bg, rgba in settings:
        tr_img, te_img = (as_rgba_cutouts(train.images), as_rgba_cutouts(test.images)) if rgba else \
            (train.images, test.images)
        tag = "rgba" if rgba else "gray"
        x_tr = x_te = folders = None
        if any(mode == "fast" for _, mode in runs):
            x_tr = cached_features(f"fmnist-lt-train{'-rgba' if rgba else ''}", tr_img, input_size=size,
                                   background=bg)
            x_te = cached_features(f"fmnist-test{'-rgba' if rgba else ''}", te_img, input_size=size, background=bg)
        for row, mode in runs:
            epochs = full_epochs if mode == "full" else args.epochs
            if mode == "full" and folders is None:
                tmp = tempfile.TemporaryDirectory(prefix="sp2ot-quality-")
                folders = (tmp, write_pngs(train, tr_img, Path(tmp.name) / "train"),
                           write_pngs(test, te_img, Path(tmp.name) / "test"))
            inputs = (x_tr, x_te) if mode == "fast" else folders[1:]
            options = {} if mode == "fast" else {"input_size": size, "background": bg, "num_workers": args.workers}
            res = {"train": [], "test": []}
            secs = []
            for seed in args.seeds:
                lab_tr, lab_te, s = fit_predict(row, *inputs, 10, seed, epochs, mode, args.init, **options)
                res["train"].append(evaluate(train.labels, lab_tr))
                res["test"].append(evaluate(test.labels, lab_te))
                secs.append(s)
            shown = "-" if row in ("kmeans", "spectral") else mode
            for split in ("train", "test"):
                mean = {m: 100 * np.mean([r[m] for r in res[split]]) for m in METRICS}
                line = (f"| {size} | {bg if rgba else '-'} ({tag}) | {row} | {shown} | "
                        f"{'-' if shown == '-' else epochs} | {split} | "
                        + " | ".join(f"{mean[m]:.1f}" for m in METRICS) + f" | {np.mean(secs):.0f} |")
                lines.append(line)
                print(line, flush=True)
        if folders is not None:
            folders[0].cleanup()
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
