"""Builders of the paper's long-tailed evaluation sets, from data the user already has locally
(benchmark support: not part of the engine; import as ``benchmarks.datasets`` from the
repository root, or as ``datasets`` from a script in this folder).

Nothing here downloads anything. Each builder reads a dataset in its standard on-disk format
and returns :class:`LabelledImages` objects (the imbalanced training set and, where the paper
has one, the balanced test set):

* :func:`cifar100_lt` -- CIFAR-100-LT (Cao et al. 2019), from the ``cifar-100-python`` pickles.
* :func:`imagenet_r` -- ImageNet-R, 20 images per class held out as the balanced test set.
* :func:`inaturalist_subset` -- iNaturalist-2018 subsets of 100 / 500 / 1000 classes.
* :func:`fashion_mnist_lt` -- Fashion-MNIST-LT, from the Debian package ``dataset-fashion-mnist``.
* :func:`digits_lt` -- a tiny long-tailed version of scikit-learn's digits, for quick tests.

The long-tail profile is the exponential one of Cao et al. 2019:
``n_c = floor(n_max * (1 / imbalance) ** (c / (C - 1)))`` for classes ``c = 0 .. C-1``, class 0
being the largest (:func:`long_tail_counts`, :func:`long_tail_indices`).

:func:`write_image_folder` and :func:`write_image_archive` turn a set into image files plus a
ground-truth CSV (``filename,label``) that the CLI / service can cluster and score.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from sp2ot_engine.io.labels_csv import write_truth

__all__ = [
    "LabelledImages",
    "long_tail_counts",
    "long_tail_indices",
    "cifar100_lt",
    "imagenet_r",
    "inaturalist_subset",
    "fashion_mnist_lt",
    "digits_lt",
    "read_idx",
    "write_image_folder",
    "write_image_archive",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_CLASSES",
    "INATURALIST_PAPER_SIZES",
    "IMAGE_EXTENSIONS",
]

PathLike = Union[str, os.PathLike]

#: Where the Debian package ``dataset-fashion-mnist`` installs its gzip IDX files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides the default Fashion-MNIST folder.
FASHION_MNIST_ENV = "SP2OT_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` "
    "(or `bash scripts/install_fashion_mnist.sh`), or pass root= a folder holding the IDX files"
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
#: Class counts of the paper's iNaturalist-2018 subsets.
INATURALIST_PAPER_SIZES = (100, 500, 1000)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------
@dataclass
class LabelledImages:
    """A labelled image set.

    ``images`` is either a uint8 array ``N x H x W`` (grey) / ``N x H x W x C`` (C = 1, 3 or 4),
    or a list of N image file paths. ``labels[i]`` in ``0 .. len(class_names) - 1``.
    """

    images: Union[np.ndarray, list]
    labels: np.ndarray
    class_names: list
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8:
                raise ValueError(f"images array must be uint8, got {self.images.dtype}")
            if self.images.ndim not in (3, 4) or (
                self.images.ndim == 4 and self.images.shape[-1] not in (1, 3, 4)
            ):
                raise ValueError(
                    f"images array must be N x H x W or N x H x W x C (C in 1,3,4), "
                    f"got shape {self.images.shape}"
                )
        else:
            self.images = [str(p) for p in self.images]
        self.labels = np.asarray(self.labels)
        if self.labels.ndim != 1 or (self.labels.size and not np.issubdtype(self.labels.dtype, np.integer)):
            raise ValueError(f"labels must be a 1-D integer array, got {self.labels.dtype} {self.labels.shape}")
        self.labels = self.labels.astype(np.int64, copy=False)
        self.class_names = [str(c) for c in self.class_names]
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must lie in 0..{len(self.class_names) - 1} "
                f"(got {self.labels.min()}..{self.labels.max()})"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_paths(self) -> bool:
        return not isinstance(self.images, np.ndarray)

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, indexed by label."""
        return np.bincount(self.labels, minlength=self.n_classes)

    def imbalance_ratio(self) -> float:
        """Largest over smallest non-empty class count."""
        counts = self.class_counts()
        counts = counts[counts > 0]
        return float(counts.max() / counts.min()) if counts.size else float("nan")

    def subset(self, indices: Sequence[int], name: str | None = None) -> "LabelledImages":
        idx = np.asarray(indices, dtype=np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return LabelledImages(images, self.labels[idx], list(self.class_names),
                              name=self.name if name is None else name, meta=dict(self.meta))

    def load_image(self, i: int):
        """Image ``i`` as a PIL image (RGB for colour data, L for grey)."""
        from PIL import Image

        if isinstance(self.images, np.ndarray):
            arr = self.images[i]
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            return Image.fromarray(arr)
        with Image.open(self.images[i]) as im:
            im.load()
            return im.copy()

    def __repr__(self) -> str:
        kind = "paths" if self.is_paths else f"array{tuple(self.images.shape)}"
        return (f"LabelledImages(name={self.name!r}, n={len(self)}, classes={self.n_classes}, "
                f"images={kind})")


# --------------------------------------------------------------------------------------------
# Long-tail profile
# --------------------------------------------------------------------------------------------
def long_tail_counts(n_max: int, n_classes: int, imbalance: float = 100) -> list[int]:
    """Per-class sizes of the exponential long tail (Cao et al. 2019).

    ``n_c = floor(n_max * (1 / imbalance) ** (c / (C - 1)))``, ``c = 0 .. C-1``; class 0 has
    ``n_max`` and class ``C-1`` has ``n_max / imbalance``.
    """
    if int(n_max) != n_max or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    if int(n_classes) != n_classes or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    if not (imbalance >= 1) or math.isinf(imbalance):
        raise ValueError(f"imbalance must be a finite number >= 1, got {imbalance!r}")
    n_max, n_classes = int(n_max), int(n_classes)
    if n_classes == 1:
        return [n_max]
    counts = []
    for c in range(n_classes):
        x = n_max * (1.0 / imbalance) ** (c / (n_classes - 1))
        # the small epsilon keeps exact integers (e.g. 6000 * 0.01 = 60) from flooring to n - 1
        counts.append(int(math.floor(x + 1e-9)))
    if counts[-1] < 1:
        raise ValueError(
            f"n_max={n_max} with imbalance={imbalance} leaves the tail class empty "
            f"(n_max / imbalance < 1)"
        )
    return counts


def long_tail_indices(labels, imbalance: float = 100, seed: int = 0, *,
                      n_max: int | None = None, n_classes: int | None = None) -> np.ndarray:
    """Indices of a long-tailed subset of a (roughly balanced) labelled set.

    Class ``c`` (labels ``0 .. C-1``, in that order; class 0 the largest) keeps
    ``long_tail_counts(n_max, C, imbalance)[c]`` of its samples, drawn uniformly at random with
    ``np.random.default_rng(seed)``. ``n_max`` defaults to the size of the smallest class so that
    every class can supply its quota. Returns the chosen indices sorted ascending (the original
    order of the data is kept).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError("labels must be a non-empty 1-D array")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be non-negative integers")
    if n_classes is None:
        n_classes = int(labels.max()) + 1
    elif labels.max() >= n_classes:
        raise ValueError(f"labels go up to {labels.max()} but n_classes={n_classes}")
    available = np.bincount(labels, minlength=n_classes)
    if n_max is None:
        n_max = int(available.min())
        if n_max == 0:
            missing = np.flatnonzero(available == 0).tolist()
            raise ValueError(f"classes {missing[:10]} have no samples; cannot build a long tail")
    counts = long_tail_counts(n_max, n_classes, imbalance)
    short = [(c, int(available[c]), counts[c]) for c in range(n_classes) if available[c] < counts[c]]
    if short:
        raise ValueError(
            "not enough samples for the long-tail quota (class, available, needed): "
            f"{short[:10]}"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        chosen.append(idx[rng.permutation(idx.size)[: counts[c]]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# CIFAR-100-LT
# --------------------------------------------------------------------------------------------
def _load_pickle(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"cannot read the CIFAR-100 {what} pickle {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"the CIFAR-100 {what} pickle {path} does not hold a dict")
    return obj


def _get_key(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"key b{key!r} missing from {path} (keys: {sorted(map(str, d))[:10]})")


def _cifar_split(path: Path, n_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path, name)
    data = np.asarray(_get_key(d, "data", path))
    labels = np.asarray(_get_key(d, "fine_labels", path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be N x 3072, got shape {data.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} fine_labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{path}: fine_labels outside 0..{n_classes - 1}")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def cifar100_lt(root: PathLike, imbalance: float = 100, seed: int = 0
                ) -> tuple[LabelledImages, LabelledImages]:
    """CIFAR-100-LT: long-tailed training set and the balanced official test set.

    ``root`` is the folder holding ``cifar-100-python/`` (or that folder itself), with the
    standard python pickles ``train``, ``test`` and ``meta``. The training set keeps
    ``floor(500 * (1/imbalance) ** (c/99))`` images of class ``c`` (10,847 in all for 100).
    """
    root = Path(root)
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    missing = [n for n in ("train", "test", "meta") if not (base / n).is_file()]
    if missing:
        raise ValueError(
            f"CIFAR-100 python files {missing} not found in {base} (looked for "
            f"{root}/cifar-100-python/{{train,test,meta}} and {root}/{{train,test,meta}})"
        )
    meta_path = base / "meta"
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _get_key(_load_pickle(meta_path, "meta"), "fine_label_names", meta_path)]
    if not names:
        raise ValueError(f"{meta_path}: empty fine_label_names")
    tr_x, tr_y = _cifar_split(base / "train", len(names), "train")
    te_x, te_y = _cifar_split(base / "test", len(names), "test")
    idx = long_tail_indices(tr_y, imbalance, seed, n_classes=len(names))
    meta = {"source": str(base), "imbalance": imbalance, "seed": seed}
    train = LabelledImages(tr_x[idx], tr_y[idx], names, name=f"cifar100-lt-{imbalance:g}", meta=meta)
    test = LabelledImages(te_x, te_y, names, name="cifar100-test", meta=dict(meta))
    return train, test


# --------------------------------------------------------------------------------------------
# ImageNet-R
# --------------------------------------------------------------------------------------------
def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _imagenet_r_names(base: Path) -> dict[str, str]:
    """wnid -> readable name from the README.txt shipped with ImageNet-R, if present."""
    readme = base / "README.txt"
    names: dict[str, str] = {}
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*(n\d{8})\s+(.+?)\s*$", line)
            if m:
                names[m.group(1)] = m.group(2)
    return names


def imagenet_r(root: PathLike, holdout_per_class: int = 20, seed: int = 0
               ) -> tuple[LabelledImages, LabelledImages]:
    """ImageNet-R: naturally imbalanced training set and a balanced held-out test set.

    ``root`` is the ``imagenet-r`` folder (or a folder holding ``imagenet-r/``), with one
    subfolder per class (ImageNet wnids such as ``n01443537``). Per class,
    ``holdout_per_class`` images chosen at random (``np.random.default_rng(seed)``, classes in
    sorted folder order) form the test set; the rest is the training set. Images are returned
    as file paths. Class names come from ``README.txt`` when it maps wnids to names, else they
    are the folder names.
    """
    if int(holdout_per_class) != holdout_per_class or holdout_per_class < 1:
        raise ValueError(f"holdout_per_class must be a positive integer, got {holdout_per_class!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ImageNet-R folder {root} does not exist")
    base = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [(d, _list_images(d)) for d in class_dirs]
    class_dirs = [(d, files) for d, files in class_dirs if files]
    if not class_dirs:
        raise ValueError(
            f"no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)}) found in {base}"
        )
    too_small = [(d.name, len(f)) for d, f in class_dirs if len(f) <= holdout_per_class]
    if too_small:
        raise ValueError(
            f"ImageNet-R classes in {base} with at most holdout_per_class={holdout_per_class} "
            f"images (nothing left to train on): {too_small[:10]}"
        )
    readable = _imagenet_r_names(base)
    names = [readable.get(d.name, d.name) for d, _ in class_dirs]
    rng = np.random.default_rng(seed)
    tr_p, tr_y, te_p, te_y = [], [], [], []
    for c, (_, files) in enumerate(class_dirs):
        perm = rng.permutation(len(files))
        held = np.sort(perm[:holdout_per_class])
        kept = np.sort(perm[holdout_per_class:])
        te_p += [str(files[i]) for i in held]
        tr_p += [str(files[i]) for i in kept]
        te_y += [c] * len(held)
        tr_y += [c] * len(kept)
    meta = {"source": str(base), "holdout_per_class": holdout_per_class, "seed": seed,
            "wnids": [d.name for d, _ in class_dirs]}
    train = LabelledImages(tr_p, np.array(tr_y, dtype=np.int64), names, name="imagenet-r-train", meta=meta)
    test = LabelledImages(te_p, np.array(te_y, dtype=np.int64), names, name="imagenet-r-test", meta=dict(meta))
    return train, test


# --------------------------------------------------------------------------------------------
# iNaturalist-2018
# --------------------------------------------------------------------------------------------
def _read_coco(path: Path) -> tuple[dict[int, str], list[tuple[int, int]], dict[int, str]]:
    """(image id -> file_name, [(image_id, category_id)], category id -> name)."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            d = json.load(fh)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read iNaturalist annotations {path}: {exc}") from exc
    for key in ("images", "annotations"):
        if not isinstance(d, dict) or not isinstance(d.get(key), list):
            raise ValueError(f"{path}: missing the COCO-style list {key!r}")
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in d["images"]}
        anns = [(int(a["image_id"]), int(a["category_id"])) for a in d["annotations"]]
        cats = {int(c["id"]): str(c.get("name", c["id"])) for c in d.get("categories", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed images/annotations/categories entry ({exc!r})") from exc
    return files, anns, cats


def inaturalist_subset(root: PathLike, n_classes: int = 100, seed: int = 0, *,
                       images_root: PathLike | None = None, check_files: bool = True
                       ) -> tuple[LabelledImages, LabelledImages]:
    """A random ``n_classes``-category subset of iNaturalist-2018 (paper: 100, 500, 1000).

    ``root`` holds ``train2018.json`` and ``val2018.json`` (COCO style); image paths are
    ``images_root / file_name`` (``images_root`` defaults to ``root``). The categories are drawn
    with ``np.random.default_rng(seed)`` among those with at least one train and one val image,
    then labelled ``0 .. n_classes-1`` in increasing category-id order. Train comes from
    train2018 (naturally long-tailed), test from val2018. With ``check_files`` every chosen
    image must exist on disk.
    """
    if int(n_classes) != n_classes or n_classes < 1:
        raise ValueError(
            f"n_classes must be a positive integer (the paper uses {INATURALIST_PAPER_SIZES}), "
            f"got {n_classes!r}"
        )
    n_classes = int(n_classes)
    root = Path(root)
    images_root = Path(images_root) if images_root is not None else root
    jsons = {s: root / f"{s}2018.json" for s in ("train", "val")}
    missing = [str(p) for p in jsons.values() if not p.is_file()]
    if missing:
        raise ValueError(f"iNaturalist-2018 annotation files not found: {missing} (looked in {root})")
    tr_files, tr_anns, tr_cats = _read_coco(jsons["train"])
    va_files, va_anns, va_cats = _read_coco(jsons["val"])
    cat_names = {**va_cats, **tr_cats}
    tr_ids = {c for _, c in tr_anns}
    va_ids = {c for _, c in va_anns}
    eligible = sorted(tr_ids & va_ids)
    if len(eligible) < n_classes:
        raise ValueError(
            f"asked for {n_classes} iNaturalist categories but only {len(eligible)} have both "
            f"train and val images in {root}"
        )
    rng = np.random.default_rng(seed)
    chosen = sorted(eligible[i] for i in rng.choice(len(eligible), size=n_classes, replace=False))
    label_of = {cid: i for i, cid in enumerate(chosen)}
    names = [cat_names.get(cid, str(cid)) for cid in chosen]

    def build(files: dict[int, str], anns: list[tuple[int, int]], json_path: Path, split: str):
        paths, labels, seen = [], [], set()
        for image_id, cid in anns:
            if cid not in label_of or image_id in seen:
                continue
            if image_id not in files:
                raise ValueError(f"{json_path}: annotation refers to unknown image id {image_id}")
            seen.add(image_id)
            paths.append(str(images_root / files[image_id]))
            labels.append(label_of[cid])
        if check_files:
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                raise ValueError(
                    f"{len(absent)} iNaturalist {split} images listed in {json_path} are missing "
                    f"under {images_root}, e.g. {absent[:3]}"
                )
        meta = {"source": str(root), "images_root": str(images_root), "seed": seed,
                "category_ids": list(chosen)}
        return LabelledImages(paths, np.array(labels, dtype=np.int64), names,
                              name=f"inaturalist2018-{n_classes}-{split}", meta=meta)

    return (build(tr_files, tr_anns, jsons["train"], "train"),
            build(va_files, va_anns, jsons["val"], "test"))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (as used by MNIST / Fashion-MNIST), gzip-compressed if it ends in .gz."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            buf = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {buf[:4]!r})")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but "
                         f"{len(buf) - header} bytes of data follow")
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(base: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (base / name).is_file():
            return base / name
    return None


def _fashion_split(base: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_idx(base, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(base, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 N x H x W images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{lab_path}: {labels.shape} labels for {len(images)} images")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"{lab_path}: labels outside 0..9")
    return images, labels


def fashion_mnist_lt(root: PathLike | None = None, imbalance: float = 100, seed: int = 0
                     ) -> tuple[LabelledImages, LabelledImages]:
    """Fashion-MNIST-LT: long-tailed training set and the balanced official 10k test set.

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; it defaults to
    ``$SP2OT_FASHION_MNIST_DIR`` or else the Debian package's ``/usr/share/datasets/fashion-mnist``.
    The training set keeps ``floor(6000 * (1/imbalance) ** (c/9))`` images of class ``c``.
    """
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEBIAN_DIR
    base = Path(root)
    stems = [f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [s for s in stems if _find_idx(base, s) is None]
    if missing:
        raise ValueError(
            f"Fashion-MNIST files {[s + '[.gz]' for s in missing]} not found in {base}; "
            f"{FASHION_MNIST_INSTALL_HINT}"
        )
    tr_x, tr_y = _fashion_split(base, "train")
    te_x, te_y = _fashion_split(base, "t10k")
    idx = long_tail_indices(tr_y, imbalance, seed, n_classes=len(FASHION_MNIST_CLASSES))
    meta = {"source": str(base), "imbalance": imbalance, "seed": seed}
    train = LabelledImages(tr_x[idx], tr_y[idx], FASHION_MNIST_CLASSES,
                           name=f"fashion-mnist-lt-{imbalance:g}", meta=meta)
    test = LabelledImages(te_x, te_y, FASHION_MNIST_CLASSES, name="fashion-mnist-test", meta=dict(meta))
    return train, test


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------
def digits_lt(imbalance: float = 10, seed: int = 0) -> LabelledImages:
    """A long-tailed version of scikit-learn's 8x8 digits (uint8 0..255), for quick tests.

    ``n_max`` is the size of the smallest digit class (174), so with the default imbalance 10
    the classes 0..9 keep 174 .. 17 images.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx = long_tail_indices(labels, imbalance, seed, n_classes=10)
    return LabelledImages(images[idx], labels[idx], [str(i) for i in range(10)],
                          name=f"digits-lt-{imbalance:g}",
                          meta={"source": "sklearn.datasets.load_digits", "imbalance": imbalance,
                                "seed": seed})


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def _encode_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _iter_files(ds: LabelledImages, to_png: bool) -> Iterator[tuple[str, int, bytes]]:
    """(file name, label, file bytes) for each image; names are ``000000.png`` ... ."""
    width = max(6, len(str(len(ds))))
    for i in range(len(ds)):
        label = int(ds.labels[i])
        if isinstance(ds.images, np.ndarray):
            yield f"{i:0{width}d}.png", label, _encode_png(ds.images[i])
            continue
        src = Path(ds.images[i])
        if not src.is_file():
            raise ValueError(f"image {i} of {ds.name or 'the set'} is missing: {src}")
        if to_png:
            yield f"{i:0{width}d}.png", label, _encode_png(np.asarray(ds.load_image(i)))
        else:
            ext = src.suffix.lower() or ".img"
            yield f"{i:0{width}d}{ext}", label, src.read_bytes()


def _write_classes(path: Path, class_names: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "class_name"])
        w.writerows(enumerate(class_names))


def write_image_folder(ds: LabelledImages, out_dir: PathLike, *, to_png: bool = False,
                       overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``ds`` as ``out_dir/images/<index>.png`` plus ``out_dir/truth.csv``.

    ``truth.csv`` has the header ``filename,label`` (file name relative to the image folder,
    integer label); ``out_dir/classes.csv`` (``label,class_name``) names the labels. File names
    carry no label information. Array images are written as PNG; path images are copied as they
    are (same extension) unless ``to_png``. Returns ``(image_folder, truth_csv)``.
    Refuses to write into a non-empty image folder unless ``overwrite`` (which empties it first).
    """
    if len(ds) == 0:
        raise ValueError("cannot write an empty image set")
    out_dir = Path(out_dir)
    folder = out_dir / "images"
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(f"{folder} already holds files; pass overwrite=True to replace them")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for fname, label, data in _iter_files(ds, to_png):
        (folder / fname).write_bytes(data)
        rows.append((fname, label))
    truth = out_dir / "truth.csv"
    write_truth(truth, rows)
    _write_classes(out_dir / "classes.csv", ds.class_names)
    return folder, truth


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def write_image_archive(ds: LabelledImages, archive_path: PathLike, *, truth_csv: PathLike | None = None,
                        to_png: bool = False) -> tuple[Path, Path]:
    """Write ``ds`` as a zip or tar archive of image files plus a separate ground-truth CSV.

    The format follows the suffix of ``archive_path``: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``,
    ``.tar.bz2`` or ``.tar.xz``. The archive holds only the images (``000000.png`` ... at its top
    level, the same names as :func:`write_image_folder`); the truth CSV (``filename,label``) goes
    to ``truth_csv`` or, by default, next to the archive as ``<stem>_truth.csv``.
    Returns ``(archive_path, truth_csv)``.
    """
    if len(ds) == 0:
        raise ValueError("cannot write an empty image set")
    archive_path = Path(archive_path)
    lower = archive_path.name.lower()
    if lower.endswith(".zip"):
        kind, mode = "zip", None
    elif lower.endswith((".tar.gz", ".tgz")):
        kind, mode = "tar", "w:gz"
    elif lower.endswith(".tar.bz2"):
        kind, mode = "tar", "w:bz2"
    elif lower.endswith(".tar.xz"):
        kind, mode = "tar", "w:xz"
    elif lower.endswith(".tar"):
        kind, mode = "tar", "w"
    else:
        raise ValueError(
            f"unknown archive type for {archive_path}: use .zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz"
        )
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    truth = Path(truth_csv) if truth_csv is not None else archive_path.with_name(
        f"{_archive_stem(archive_path)}_truth.csv")
    rows = []
    if kind == "zip":
        # PNG / JPEG are already compressed: store them.
        with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_STORED) as zf:
            for fname, label, data in _iter_files(ds, to_png):
                zf.writestr(fname, data)
                rows.append((fname, label))
    else:
        with tarfile.open(archive_path, mode) as tf:
            for fname, label, data in _iter_files(ds, to_png):
                info = tarfile.TarInfo(fname)
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
                rows.append((fname, label))
    truth.parent.mkdir(parents=True, exist_ok=True)
    write_truth(truth, rows)
    return archive_path, truth
