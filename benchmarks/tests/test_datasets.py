"""Tests of benchmarks/datasets.py on small fake data written in the real on-disk formats."""
from __future__ import annotations

import csv
import gzip
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import datasets as D
from benchmarks.datasets import LabelledImages


# ------------------------------------------------------------------ helpers writing fake data
def _png(path: Path, value: int, size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, dtype=np.uint8)).save(path)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """Independent IDX writer: 0,0,type=0x08,ndim then big-endian uint32 dims then raw bytes."""
    assert arr.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def _fake_cifar(root: Path, n_classes=5, per_class_train=10, per_class_test=4) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    names = [f"class{c}".encode() for c in range(n_classes)]
    pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"x"]}, open(base / "meta", "wb"))
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.tile(np.arange(n_classes), per)          # interleaved, like the real file
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        data[:, 0] = labels                                   # R of pixel (0,0)
        data[:, 1024] = labels + 100                          # G of pixel (0,0)
        data[:, 1] = np.arange(len(labels)) % 251             # R of pixel (0,1): original index
        pickle.dump({b"data": data, b"fine_labels": labels.tolist(),
                     b"coarse_labels": [0] * len(labels)}, open(base / split, "wb"))
    return root


def _fake_imagenet_r(root: Path, sizes=(25, 30, 22)) -> Path:
    base = root / "imagenet-r"
    wnids = [f"n0{1000000 + i:07d}" for i in range(len(sizes))]
    for c, (wnid, n) in enumerate(zip(wnids, sizes)):
        for k in range(n):
            _png(base / wnid / f"art_{k}.jpg" if k % 2 else base / wnid / f"photo_{k}.png", c * 10)
    (base / "README.txt").write_text(
        "ImageNet-R readme\n" + "".join(f"{w} animal{i}\n" for i, w in enumerate(wnids)))
    return base


def _fake_inat(root: Path, n_cats=120, no_val_cat=5):
    root.mkdir(parents=True, exist_ok=True)
    next_id = [1]
    per_cat_train = {}

    def split(name, per_cat):
        images, anns = [], []
        for cid in range(n_cats):
            n = per_cat(cid)
            for _ in range(n):
                iid = next_id[0]
                next_id[0] += 1
                fname = f"train_val2018/Plantae/{cid}/{iid}.jpg"
                (root / fname).parent.mkdir(parents=True, exist_ok=True)
                (root / fname).write_bytes(b"\xff\xd8fake")
                images.append({"id": iid, "file_name": fname, "width": 1, "height": 1})
                anns.append({"id": iid, "image_id": iid, "category_id": cid})
        cats = [{"id": cid, "name": f"species {cid}", "supercategory": "Plantae"} for cid in range(n_cats)]
        json.dump({"images": images, "annotations": anns, "categories": cats,
                   "info": {}, "licenses": []}, open(root / f"{name}2018.json", "w"))

    def train_n(cid):
        per_cat_train[cid] = cid % 7 + 1
        return per_cat_train[cid]

    split("train", train_n)
    split("val", lambda cid: 0 if cid == no_val_cat else 3)
    return per_cat_train


# ------------------------------------------------------------------ long-tail profile
def test_long_tail_counts_cifar100_profile():
    counts = D.long_tail_counts(500, 100, 100)
    assert len(counts) == 100
    assert counts[0] == 500 and counts[-1] == 5
    # by hand: 500 * 0.01**(1/99) = 500 * 10**(-2/99) = 500 * 0.95455 = 477.27 -> 477
    assert counts[1] == 477
    # by hand: 500 * 0.01**(50/99) = 500 * 10**(-1.0101) = 500 * 0.097701 = 48.85 -> 48
    assert counts[50] == 48
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) == 10847  # the published size of CIFAR-100-LT (ratio 100)


def test_long_tail_counts_fashion_profile_and_edges():
    # 6000 * 10**(-2c/9): 3596.9, 2156.9, 1292.9, 774.3, 464.2, 278.3, 166.8, 100.08, 60
    assert D.long_tail_counts(6000, 10, 100) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert D.long_tail_counts(7, 4, 1) == [7, 7, 7, 7]
    assert D.long_tail_counts(9, 1, 100) == [9]
    assert D.long_tail_counts(10, 2, 10) == [10, 1]
    for bad in [(0, 10, 10), (10, 0, 10), (10, 3, 0.5), (5, 3, 100)]:
        with pytest.raises(ValueError):
            D.long_tail_counts(*bad)


def test_long_tail_indices_counts_and_determinism():
    rng = np.random.default_rng(123)
    labels = rng.permutation(np.repeat(np.arange(5), 40))
    a = D.long_tail_indices(labels, imbalance=10, seed=7)
    b = D.long_tail_indices(labels, imbalance=10, seed=7)
    c = D.long_tail_indices(labels, imbalance=10, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0)  # sorted, no duplicates
    expected = D.long_tail_counts(40, 5, 10)
    assert np.bincount(labels[a], minlength=5).tolist() == expected
    assert np.bincount(labels[c], minlength=5).tolist() == expected


def test_long_tail_indices_validates():
    with pytest.raises(ValueError, match="not enough samples"):
        D.long_tail_indices(np.repeat(np.arange(3), 4), imbalance=2, n_max=10)
    with pytest.raises(ValueError, match="no samples"):
        D.long_tail_indices(np.array([0, 0, 2, 2]), imbalance=2)
    with pytest.raises(ValueError):
        D.long_tail_indices(np.array([0.5, 1.0]), imbalance=2)


# ------------------------------------------------------------------ CIFAR-100-LT
def test_cifar100_lt_on_fake_pickles(tmp_path):
    root = _fake_cifar(tmp_path)
    train, test = D.cifar100_lt(root, imbalance=10, seed=0)
    assert train.class_names == [f"class{c}" for c in range(5)]
    assert train.class_counts().tolist() == D.long_tail_counts(10, 5, 10) == [10, 5, 3, 1, 1]
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    # images stay paired with their labels, and the CHW -> HWC reshape is right
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels)
    np.testing.assert_array_equal(train.images[:, 0, 0, 1], train.labels + 100)
    # the balanced official test set, untouched
    assert test.class_counts().tolist() == [4] * 5 and len(test) == 20
    np.testing.assert_array_equal(test.images[:, 0, 1, 0], np.arange(20))
    # deterministic with the seed; root may also be the cifar-100-python folder itself
    again, _ = D.cifar100_lt(root / "cifar-100-python", imbalance=10, seed=0)
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = D.cifar100_lt(root, imbalance=10, seed=1)
    assert not np.array_equal(other.images[:, 0, 1, 0], train.images[:, 0, 1, 0])


def test_cifar100_lt_errors(tmp_path):
    with pytest.raises(ValueError, match=r"not found in .*meta"):
        D.cifar100_lt(tmp_path)
    root = _fake_cifar(tmp_path / "x")
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, open(root / "cifar-100-python" / "train", "wb"))
    with pytest.raises(ValueError, match="fine_labels"):
        D.cifar100_lt(root)


# ------------------------------------------------------------------ ImageNet-R
def test_imagenet_r_holdout(tmp_path):
    base = _fake_imagenet_r(tmp_path)
    train, test = D.imagenet_r(tmp_path, holdout_per_class=20, seed=0)
    assert train.is_paths and test.is_paths
    assert train.class_names == ["animal0", "animal1", "animal2"]
    assert test.class_counts().tolist() == [20, 20, 20]
    assert train.class_counts().tolist() == [5, 10, 2]
    assert set(train.images).isdisjoint(test.images)
    all_files = {str(p) for p in base.rglob("*") if p.suffix in (".png", ".jpg")}
    assert set(train.images) | set(test.images) == all_files
    for ds in (train, test):  # each path lies in its class folder
        for p, y in zip(ds.images, ds.labels):
            assert Path(p).parent.name == ds.meta["wnids"][y]
    again, again_test = D.imagenet_r(base, holdout_per_class=20, seed=0)
    assert again.images == train.images and again_test.images == test.images
    _, other_test = D.imagenet_r(base, holdout_per_class=20, seed=1)
    assert other_test.images != test.images


def test_imagenet_r_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.imagenet_r(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        D.imagenet_r(tmp_path / "empty")
    _fake_imagenet_r(tmp_path / "small", sizes=(25, 20))
    with pytest.raises(ValueError, match="nothing left to train"):
        D.imagenet_r(tmp_path / "small", holdout_per_class=20)


# ------------------------------------------------------------------ iNaturalist-2018
def test_inaturalist_subset(tmp_path):
    per_cat_train = _fake_inat(tmp_path)
    train, test = D.inaturalist_subset(tmp_path, n_classes=100, seed=0)
    cats = train.meta["category_ids"]
    assert len(cats) == 100 and cats == sorted(cats) and 5 not in cats  # cat 5 has no val image
    assert train.class_names == [f"species {c}" for c in cats]
    assert test.class_counts().tolist() == [3] * 100                     # balanced val
    assert train.class_counts().tolist() == [per_cat_train[c] for c in cats]
    for ds in (train, test):
        for p, y in zip(ds.images, ds.labels):
            assert Path(p).is_file() and Path(p).parent.name == str(cats[y])
    again, _ = D.inaturalist_subset(tmp_path, n_classes=100, seed=0)
    assert again.images == train.images
    other, _ = D.inaturalist_subset(tmp_path, n_classes=100, seed=3)
    assert other.meta["category_ids"] != cats
    small, small_test = D.inaturalist_subset(tmp_path, n_classes=10, seed=0)
    assert small.n_classes == 10 and len(small_test) == 30


def test_inaturalist_errors(tmp_path):
    with pytest.raises(ValueError, match="train2018.json"):
        D.inaturalist_subset(tmp_path, n_classes=100)
    _fake_inat(tmp_path, n_cats=12)
    with pytest.raises(ValueError, match="only 11"):
        D.inaturalist_subset(tmp_path, n_classes=100)
    with pytest.raises(ValueError, match="positive integer"):
        D.inaturalist_subset(tmp_path, n_classes=0)
    victim = next((tmp_path / "train_val2018").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(ValueError, match="missing"):
        D.inaturalist_subset(tmp_path, n_classes=11, seed=0)
    train, test = D.inaturalist_subset(tmp_path, n_classes=11, seed=0, check_files=False)
    assert str(victim) in train.images + test.images  # listed, though absent, when not checking


# ------------------------------------------------------------------ Fashion-MNIST (IDX)
def _fake_fashion(root: Path, per_class_train=100, per_class_test=7) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels
        images[:, 27, 26] = 200
        _write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    _write_idx_gz(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "raw").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "raw"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="bytes of data"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_lt_on_fake_idx(tmp_path):
    root = _fake_fashion(tmp_path / "fm")
    train, test = D.fashion_mnist_lt(root, imbalance=100, seed=0)
    assert train.class_names == D.FASHION_MNIST_CLASSES
    # 100 * 10**(-2c/9) floored
    assert train.class_counts().tolist() == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    np.testing.assert_array_equal(train.images[:, 0, 0], train.labels)
    assert train.images.shape[1:] == (28, 28) and np.all(train.images[:, 27, 26] == 200)
    assert test.class_counts().tolist() == [7] * 10
    again, _ = D.fashion_mnist_lt(root, imbalance=100, seed=0)
    np.testing.assert_array_equal(again.labels, train.labels)


def test_fashion_mnist_missing_gives_install_hint(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as exc:
        D.fashion_mnist_lt(tmp_path / "nowhere")
    msg = str(exc.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "scripts/install_fashion_mnist.sh" in msg and str(tmp_path / "nowhere") in msg
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path / "env_dir"))
    with pytest.raises(ValueError, match="env_dir"):
        D.fashion_mnist_lt()


@pytest.mark.skipif(
    not (D.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (bash scripts/install_fashion_mnist.sh)",
)
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    train, test = D.fashion_mnist_lt()
    assert train.n_classes == 10
    assert train.class_counts().tolist() == D.long_tail_counts(6000, 10, 100)
    assert len(train) == 14886 and train.images.shape[1:] == (28, 28)
    assert test.class_counts().tolist() == [1000] * 10
    assert train.imbalance_ratio() == pytest.approx(100.0)


# ------------------------------------------------------------------ digits
def test_digits_lt():
    ds = D.digits_lt(imbalance=10, seed=0)
    assert ds.class_counts().tolist() == D.long_tail_counts(174, 10, 10)
    assert ds.class_counts()[0] == 174 and ds.class_counts()[-1] == 17
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (8, 8) and ds.images.max() == 255
    np.testing.assert_array_equal(D.digits_lt(imbalance=10, seed=0).images, ds.images)


# ------------------------------------------------------------------ writers
def test_write_image_folder_arrays(tmp_path):
    ds = D.digits_lt(imbalance=10, seed=1).subset(range(40))
    folder, truth = D.write_image_folder(ds, tmp_path / "out")
    rows = _read_csv(truth)
    assert list(rows[0]) == ["filename", "label"] and len(rows) == 40
    assert sorted(p.name for p in folder.iterdir()) == sorted(r["filename"] for r in rows)
    for i, r in enumerate(rows):
        assert int(r["label"]) == ds.labels[i]
        np.testing.assert_array_equal(np.asarray(Image.open(folder / r["filename"])), ds.images[i])
    classes = _read_csv(tmp_path / "out" / "classes.csv")
    assert [c["class_name"] for c in classes] == ds.class_names
    with pytest.raises(ValueError, match="overwrite"):
        D.write_image_folder(ds, tmp_path / "out")
    folder2, truth2 = D.write_image_folder(ds.subset(range(5)), tmp_path / "out", overwrite=True)
    assert len(list(folder2.iterdir())) == 5 and len(_read_csv(truth2)) == 5


def test_write_image_folder_paths_and_rgb(tmp_path):
    _fake_imagenet_r(tmp_path / "inr")
    _, test = D.imagenet_r(tmp_path / "inr", holdout_per_class=20, seed=0)
    folder, truth = D.write_image_folder(test, tmp_path / "copy")
    rows = _read_csv(truth)
    assert len(rows) == 60
    for r, src in zip(rows, test.images):
        assert Path(r["filename"]).suffix == Path(src).suffix
        assert (folder / r["filename"]).read_bytes() == Path(src).read_bytes()
    folder, truth = D.write_image_folder(test, tmp_path / "png", to_png=True)
    assert all(p.suffix == ".png" for p in folder.iterdir())
    rgb = LabelledImages(np.full((3, 5, 6, 3), 9, np.uint8), np.array([0, 1, 1]), ["a", "b"])
    folder, _ = D.write_image_folder(rgb, tmp_path / "rgb")
    assert np.asarray(Image.open(folder / "000001.png")).shape == (5, 6, 3)


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz"])
def test_write_image_archive(tmp_path, suffix):
    ds = D.digits_lt(imbalance=10, seed=0).subset(range(12))
    archive, truth = D.write_image_archive(ds, tmp_path / f"digits{suffix}")
    assert truth == tmp_path / "digits_truth.csv"
    rows = _read_csv(truth)
    if suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            first = zf.read(rows[0]["filename"])
    else:
        with tarfile.open(archive) as tf:
            names = tf.getnames()
            first = tf.extractfile(rows[0]["filename"]).read()
    assert names == [r["filename"] for r in rows] and len(names) == 12
    assert [int(r["label"]) for r in rows] == ds.labels.tolist()
    import io
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first))), ds.images[0])


def test_writer_validation(tmp_path):
    ds = D.digits_lt().subset(range(3))
    with pytest.raises(ValueError, match="unknown archive type"):
        D.write_image_archive(ds, tmp_path / "x.rar")
    gone = LabelledImages([str(tmp_path / "missing.png")], np.array([0]), ["a"])
    with pytest.raises(ValueError, match="missing"):
        D.write_image_folder(gone, tmp_path / "o")


def test_labelled_images_validation():
    with pytest.raises(ValueError, match="labels"):
        LabelledImages(np.zeros((2, 4, 4), np.uint8), np.array([0]), ["a"])
    with pytest.raises(ValueError, match="0..0"):
        LabelledImages(np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), ["a"])
    with pytest.raises(ValueError, match="uint8"):
        LabelledImages(np.zeros((1, 4, 4), np.float32), np.array([0]), ["a"])
