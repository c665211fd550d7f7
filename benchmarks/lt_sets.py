"""The long-tailed benchmark sets of the quality study, as cached backbone features.

Every set is an imbalanced subset of data that ships offline (Debian's
``dataset-fashion-mnist``, scikit-learn's digits), built with the exponential long-tail profile
of Cao et al. 2019 (``n_c = n_max * (1/imbalance) ** (c / (C - 1))``) after reordering the
classes, so that each set has its own head and tail classes:

| name | source | imbalance | n_max | class order (largest first) | images |
|---|---|---|---|---|---|
| ``fmnist-lt100`` | Fashion-MNIST train | 100 | 6,000 | 0 1 2 ... 9 (the standard Fashion-MNIST-LT) | 14,886 |
| ``fmnist-lt10-r`` | Fashion-MNIST train | 10 | 2,000 | 9 8 7 ... 0 | 8,169 |
| ``fmnist-test-lt50`` | Fashion-MNIST test | 50 | 1,000 | 6 4 2 0 3 8 1 5 7 9 | 2,795 |
| ``digits-lt10`` | scikit-learn digits | 10 | 174 | 3 1 4 5 9 2 6 8 0 7 | 707 |
| ``fmnist-lt50-s`` (held out) | Fashion-MNIST train | 50 | 3,000 | 3 7 0 8 2 5 9 1 6 4 | 8,397 |
| ``fmnist-test-lt10-s`` (held out) | Fashion-MNIST test | 10 | 1,000 | 8 0 5 2 9 6 3 1 7 4 | 4,084 |

Features are the default backbone's (EfficientNet-Lite0, 224 px, white background) of every
image of the source split, extracted once into ``benchmarks/.cache/`` (Fashion-MNIST: 70,000
images, ~15 min on 2 cores) and indexed per set, so a set costs nothing once its split is cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import cached_features

SETS = ("fmnist-lt100", "fmnist-lt10-r", "fmnist-test-lt50", "digits-lt10")
#: Held out while the defaults were chosen, then used to check them.
HELD_OUT = ("fmnist-lt50-s", "fmnist-test-lt10-s")

# (source split, imbalance, n_max, class order, subset seed)
_SPECS = {
    "fmnist-lt100": ("fmnist-train", 100, 6000, tuple(range(10)), 0),
    "fmnist-lt10-r": ("fmnist-train", 10, 2000, tuple(range(9, -1, -1)), 1),
    "fmnist-test-lt50": ("fmnist-t10k", 50, 1000, (6, 4, 2, 0, 3, 8, 1, 5, 7, 9), 2),
    "digits-lt10": ("digits", 10, 174, (3, 1, 4, 5, 9, 2, 6, 8, 0, 7), 3),
    "fmnist-lt50-s": ("fmnist-train", 50, 3000, (3, 7, 0, 8, 2, 5, 9, 1, 6, 4), 4),
    "fmnist-test-lt10-s": ("fmnist-t10k", 10, 1000, (8, 0, 5, 2, 9, 6, 3, 1, 7, 4), 5),
}


@dataclass
class FeatureSet:
    name: str
    features: np.ndarray  # N x d float32
    labels: np.ndarray  # N, class ids of the source
    images: np.ndarray  # N x H x W uint8

    @property
    def n_classes(self) -> int:
        return int(np.unique(self.labels).size)

    def describe(self) -> str:
        counts = np.bincount(self.labels)
        counts = np.sort(counts[counts > 0])[::-1]
        return f"{self.name}: {len(self.labels)} images, {self.n_classes} classes, sizes {counts.tolist()}"


def _source(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), d.target.astype(np.int64)
    from pathlib import Path

    from datasets import FASHION_MNIST_DEBIAN_DIR, _fashion_split

    return _fashion_split(Path(FASHION_MNIST_DEBIAN_DIR), split.split("-", 1)[1])


def ordered_long_tail(labels: np.ndarray, order: tuple[int, ...], imbalance: float, n_max: int,
                      seed: int) -> np.ndarray:
    """Sorted indices of a long-tailed subset whose ``c``-th largest class is ``order[c]``."""
    from datasets import long_tail_counts

    counts = long_tail_counts(n_max, len(order), imbalance)
    rng = np.random.default_rng(seed)
    chosen = []
    for rank, cls in enumerate(order):
        idx = np.flatnonzero(labels == cls)
        chosen.append(idx[rng.permutation(idx.size)[:counts[rank]]])
    return np.sort(np.concatenate(chosen))


def load_set(name: str) -> FeatureSet:
    """Features, labels and images of one benchmark set (features cached on disk)."""
    if name not in _SPECS:
        raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS + HELD_OUT)}")
    split, imbalance, n_max, order, seed = _SPECS[name]
    images, labels = _source(split)
    feats = cached_features(f"{split}-all", images, input_size=224, num_workers=0)
    idx = ordered_long_tail(labels, order, imbalance, n_max, seed)
    return FeatureSet(name, np.ascontiguousarray(feats[idx]), labels[idx], images[idx])
