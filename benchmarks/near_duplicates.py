"""Near-duplicate flag (``duplicate_of``): recall and precision on injected copies, per threshold.

    python benchmarks/near_duplicates.py                  # 2,000 Fashion-MNIST test images + 5 % copies
    python benchmarks/near_duplicates.py --n 3000 --share 0.05 --seed 1

Takes ``--n`` images of the Fashion-MNIST test split (Debian's ``dataset-fashion-mnist``; exact
pixel duplicates among them are dropped first, so every true pair is an injected one), picks
``share * n`` of them and adds one altered copy of each at a random place in the set, cycling
through four alterations: re-encoded as JPEG, resized (bicubic), slightly cropped, and all three
at once (``--strength mild``, the default: quality 70-95, 0.85-1.5x, one pixel off two sides;
``strong``: quality 60-90, 0.75-1.5x, 1-3 pixels off every side). Every
image goes through the engine's own path (decode, RGB on white, eval transform) to the default
backbone's features (EfficientNet-Lite0, offline weights) and the 64-bit perceptual hash of the
same decoded image (as the estimator's feature extraction computes them), the cosine 20-NN graph
of the estimator is built, and :func:`sp2ot_engine.flags.duplicate_of` runs at each threshold:
features alone (as for a fit on a feature matrix), then features with hashes (a fit on images).

A flagged image (``duplicate_of >= 0``) is right when it and the image it points to are an
injected original/copy pair; recall is the share of injected pairs flagged that way (either
member pointing to the other), precision the share of flagged images that are right.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

ALTERATIONS = ("jpeg", "resize", "crop", "all")
THRESHOLDS = (0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
HASH_THRESHOLDS = (0.85, 0.88, 0.90, 0.92)
MAX_HAMMINGS = (0, 2, 4, 6, 8)


#: How hard each alteration is: JPEG quality range, resize factor range, pixels cropped per side and
#: how many sides. "mild": a re-save, a rescale, one pixel off two sides (about 7 % of the area of a
#: 28-pixel image); "strong": 1-3 pixels off every side (up to 40 % of the area).
STRENGTHS = {
    "mild": {"quality": (70, 96), "scale": (0.85, 1.5), "crop": (1, 2), "sides": 2},
    "strong": {"quality": (60, 91), "scale": (0.75, 1.5), "crop": (1, 4), "sides": 4},
}


def alter(img: np.ndarray, kind: str, rng: np.random.Generator, strength: str = "mild") -> np.ndarray:
    """One altered copy of a uint8 grey image (any size; the backbone resizes)."""
    how = STRENGTHS[strength]
    im = Image.fromarray(img)
    if kind in ("crop", "all"):
        box = [0, 0, im.width, im.height]
        for side in rng.choice(4, size=how["sides"], replace=False):
            cut = int(rng.integers(*how["crop"]))
            box[side] += cut if side < 2 else -cut
        im = im.crop(tuple(box))
    if kind in ("resize", "all"):
        scale = float(rng.uniform(*how["scale"]))
        im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BICUBIC)
    if kind in ("jpeg", "all"):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(*how["quality"])))
        im = Image.open(io.BytesIO(buf.getvalue()))
        im.load()
    return np.asarray(im.convert("L"))


def build_set(n: int, share: float, seed: int, strength: str = "mild"):
    """Images (a list of arrays), for each injected copy ``(original index, copy index, alteration)``,
    and how many pixel-identical repeats of the split were passed over."""
    from datasets import FASHION_MNIST_DEBIAN_DIR, _fashion_split

    images, _ = _fashion_split(Path(FASHION_MNIST_DEBIAN_DIR), "t10k")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    seen, base, n_dropped = set(), [], 0
    for i in order:  # n distinct images: pixel-identical ones would be true pairs nobody injected
        key = images[i].tobytes()
        if key in seen:
            n_dropped += 1
            continue
        seen.add(key)
        base.append(images[i])
        if len(base) == n:
            break
    n_copies = int(round(share * n))
    sources = rng.choice(n, n_copies, replace=False)
    items = [("orig", i) for i in range(n)] + [("copy", int(s), k) for k, s in enumerate(sources)]
    perm = rng.permutation(len(items))
    position = {}
    out = []
    for new, old in enumerate(perm):
        item = items[old]
        if item[0] == "orig":
            out.append(base[item[1]])
            position[("orig", item[1])] = new
        else:
            out.append(alter(base[item[1]], ALTERATIONS[item[2] % len(ALTERATIONS)], rng, strength))
            position[("copy", item[2])] = new
    pairs = [(position[("orig", int(s))], position[("copy", k)], ALTERATIONS[k % len(ALTERATIONS)])
             for k, s in enumerate(sources)]
    return out, pairs, n_dropped


class _Images:
    """uint8 grey arrays of any size through the engine's RGB conversion and eval transform."""

    returns_index = True

    def __init__(self, images, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from sp2ot_engine.io.decode import to_rgb

        from sp2ot_engine.flags import perceptual_hash_int64

        rgb = to_rgb(Image.fromarray(self.images[i]), "white")
        return self.transform(rgb), i, perceptual_hash_int64(rgb)


def features_of(images) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (``N x d``) and perceptual hashes (``N`` uint64) of the same decoded images,
    as the estimator's feature extraction makes them."""
    from sp2ot_engine.backbones import create_backbone, extract_features
    from sp2ot_engine.transforms import eval_transform

    bb = create_backbone("efficientnet_lite0")
    bb.freeze_all()
    data = _Images(images, eval_transform(bb.input_size, bb.mean, bb.std))
    hashes = np.zeros(len(images), dtype=np.int64)

    def keep(index, extras) -> None:
        hashes[index.numpy()] = extras[0].numpy()

    x = extract_features(bb, data, batch_size=64, num_workers=0, on_extras=keep).numpy()
    return x, hashes.view(np.uint64)


def score(dup: np.ndarray, pairs) -> tuple[float, float, dict[str, float]]:
    true = {frozenset((a, b)) for a, b, _ in pairs}
    flagged = np.flatnonzero(dup >= 0)
    right = sum(frozenset((int(i), int(dup[i]))) in true for i in flagged)
    found = {kind: [] for kind in ALTERATIONS}
    for a, b, kind in pairs:
        found[kind].append(dup[a] == b or dup[b] == a)
    recall = float(np.mean([x for v in found.values() for x in v]))
    precision = right / len(flagged) if len(flagged) else 1.0
    return recall, precision, {k: float(np.mean(v)) for k, v in found.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="distinct original images")
    ap.add_argument("--share", type=float, default=0.05, help="injected copies per original image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strength", choices=tuple(STRENGTHS), default="mild")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import faiss
    import torch

    from sp2ot_engine.flags import (DUPLICATE_HASH_THRESHOLD, DUPLICATE_MAX_HAMMING, DUPLICATE_THRESHOLD, duplicate_of,
                                    hamming)
    from sp2ot_engine.graph import knn_graph

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    images, pairs, n_dropped = build_set(args.n, args.share, args.seed, args.strength)
    t = time.perf_counter()
    x, hashes = features_of(images)
    print(f"{args.strength} alterations: {len(images)} images ({args.n} distinct Fashion-MNIST test images + {len(pairs)} altered copies, "
          f"{100 * len(pairs) / len(images):.1f} % of the set; {n_dropped} pixel-identical repeats passed over), "
          f"features in {time.perf_counter() - t:.0f} s")
    graph = knn_graph(x, k=20, kernel="cosine")
    sims = np.array([float(np.dot(x[a], x[b]) / np.linalg.norm(x[a]) / np.linalg.norm(x[b])) for a, b, _ in pairs])
    print(f"cosine similarity of the injected pairs: min {sims.min():.3f}, 5th percentile "
          f"{np.percentile(sims, 5):.3f}, median {np.median(sims):.3f}")
    print("features alone (fitted on a feature matrix):")
    print("| threshold | flagged | recall | precision | recall per alteration (" + ", ".join(ALTERATIONS) + ") |")
    print("|---|---|---|---|---|")
    for threshold in sorted(set(THRESHOLDS) | {DUPLICATE_THRESHOLD}):
        dup = duplicate_of(graph, threshold)
        _row(f"{threshold:.2f}" + (" (default)" if threshold == DUPLICATE_THRESHOLD else ""), dup, pairs)
    ham = hamming(hashes[[a for a, _, _ in pairs]], hashes[[b for _, b, _ in pairs]])
    print(f"perceptual-hash Hamming distance of the injected pairs: median {np.median(ham):.0f}, 90th percentile "
          f"{np.percentile(ham, 90):.0f}, max {ham.max()} (of 64); per alteration max "
          + ", ".join(f"{k} {max(int(h) for h, p in zip(ham, pairs) if p[2] == k)}" for k in ALTERATIONS))
    print("perceptual hashes alone on the same graph edges (no similarity floor):")
    print("| max Hamming | flagged | recall | precision | recall per alteration (" + ", ".join(ALTERATIONS) + ") |")
    print("|---|---|---|---|---|")
    for max_hamming in MAX_HAMMINGS:
        _row(str(max_hamming), duplicate_of(graph, 2.0, hashes=hashes, max_hamming=max_hamming, hash_threshold=-1.0),
             pairs)
    print("features and perceptual hashes (fitted on images): an edge joins when cos >= threshold, or when "
          "cos >= hash threshold and the hashes differ in at most max Hamming bits:")
    print("| threshold | hash threshold | max Hamming | flagged | recall | precision | recall per alteration (" + ", ".join(ALTERATIONS) + ") |")
    print("|---|---|---|---|---|---|---|")
    for threshold in (0.95, 0.96, 0.97):
        for hash_threshold in HASH_THRESHOLDS:
            for max_hamming in MAX_HAMMINGS:
                dup = duplicate_of(graph, threshold, hashes=hashes, max_hamming=max_hamming,
                                   hash_threshold=hash_threshold)
                default = (threshold, hash_threshold, max_hamming) == (DUPLICATE_THRESHOLD, DUPLICATE_HASH_THRESHOLD,
                                                                       DUPLICATE_MAX_HAMMING)
                _row(f"{threshold:.2f} | {hash_threshold:.2f} | {max_hamming}" + (" (default)" if default else ""),
                     dup, pairs)
    # the same graph edges ranked by two similarities: what any threshold could reach at precision 0.95
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = whitened(x)
    for name, feats in (("cosine (the engine's)", u), ("PCA-whitened cosine, 512 dims (not in the engine)", z)):
        rec, at = best_recall_at_precision(graph, lambda r, c, f=feats: np.einsum("nd,nd->n", f[r], f[c]), pairs)
        print(f"edges of the 20-NN graph ranked by {name}: best recall at precision >= 0.95 is {rec:.3f} "
              f"(similarity >= {at:.3f})")


def _row(head: str, dup: np.ndarray, pairs) -> None:
    recall, precision, per_kind = score(dup, pairs)
    print(f"| {head} | {int((dup >= 0).sum())} | {recall:.3f} | {precision:.3f} | "
          + " / ".join(f"{per_kind[k]:.2f}" for k in ALTERATIONS) + " |", flush=True)


def best_recall_at_precision(graph, scores_of, pairs, precision: float = 0.95) -> tuple[float, float]:
    """Ranking the graph's edges (either direction, once) by ``scores_of(rows, cols)``: the highest
    share of injected pairs among the top edges while at least ``precision`` of them are injected
    pairs, and the score where that happens."""
    import scipy.sparse as sp

    upper = sp.triu(graph + graph.T, k=1).tocoo()
    rows, cols = upper.row, upper.col
    true = {frozenset((a, b)) for a, b, _ in pairs}
    label = np.array([frozenset((int(i), int(j))) in true for i, j in zip(rows, cols)])
    sc = scores_of(rows, cols)
    order = np.argsort(-sc)
    tp = np.cumsum(label[order])
    prec = tp / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(prec >= precision)
    if not ok.size:
        return 0.0, float("nan")
    return float(tp[ok].max() / len(true)), float(sc[order][ok[np.argmax(tp[ok])]])


def whitened(x: np.ndarray, dims: int = 512, shrink: float = 1e-3) -> np.ndarray:
    """PCA-whitened unit features (``dims`` leading components, eigenvalues + ``shrink * largest``)."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    centred = u - u.mean(axis=0)
    w, v = np.linalg.eigh(centred.T @ centred / len(u))
    w, v = w[::-1][:dims], v[:, ::-1][:, :dims]
    z = centred @ v / np.sqrt(w + shrink * w[0])
    return z / np.linalg.norm(z, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
