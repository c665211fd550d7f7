"""Choosing K (``n_clusters=None``), the outlier and duplicate flags, and their columns in the
CLI's labels.csv. Synthetic unit-norm mixtures: seconds."""
from __future__ import annotations

import numpy as np
import pytest

from sp2ot_engine import SP2OTClustering
from sp2ot_engine.auto_k import K_CRITERIA, choose_k, k_range
from sp2ot_engine.cli import main
from sp2ot_engine.flags import (DUPLICATE_HASH_THRESHOLD, DUPLICATE_MAX_HAMMING, DUPLICATE_THRESHOLD, OUTLIER_THRESHOLD,
                                duplicate_of, hamming, outlier_scores, perceptual_hash)
from sp2ot_engine.graph import knn_graph


def long_tailed_mixture(k: int = 7, n_max: int = 300, imbalance: float = 12.0, d: int = 32, noise: float = 0.06,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well-separated clusters on the sphere, sizes ``n_max * imbalance ** (-c / (k - 1))``."""
    rng = np.random.default_rng(seed)
    sizes = [int(n_max * imbalance ** (-c / (k - 1))) for c in range(k)]
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([centres[c] + noise * rng.standard_normal((s, d)) for c, s in enumerate(sizes)])
    return x.astype(np.float32), np.repeat(np.arange(k), sizes)


# ------------------------------------------------------------------------------ choosing K
@pytest.mark.parametrize("criterion", K_CRITERIA)
def test_every_criterion_finds_the_clusters_of_a_separated_long_tailed_mixture(criterion):
    x, y = long_tailed_mixture()
    assert np.bincount(y).min() == 25  # the tail: 12 times smaller than the head
    choice = choose_k(knn_graph(x, k=15, kernel="cosine"), x, 2, 15, criterion=criterion)
    assert choice.k == 7 and sorted(choice.curve) == list(range(2, 16))
    assert choice.curve[7] == max(choice.curve.values())


def test_the_estimator_chooses_k_and_reports_the_curve():
    x, y = long_tailed_mixture(seed=1)
    est = SP2OTClustering(None, k_max=12, epochs=1, init="spectral", device="cpu").fit(x)
    assert est.n_clusters_ == 7 == len(est.cluster_sizes_) and est.k_criterion_ == K_CRITERIA[0]
    assert sorted(est.k_curve_) == list(range(2, 13))
    assert est.predict(x[:5]).shape == (5,)
    given = SP2OTClustering(7, epochs=1, init="spectral", device="cpu").fit(x)
    assert given.n_clusters_ == 7 and given.k_curve_ == {} and given.k_criterion_ is None


def test_a_saved_auto_k_model_predicts_with_the_chosen_k(tmp_path):
    x, _ = long_tailed_mixture(k=4, n_max=80, seed=2)
    est = SP2OTClustering(None, k_max=6, epochs=1, init="spectral", device="cpu").fit(x)
    est.save(tmp_path / "m.pt")
    loaded = SP2OTClustering.load(tmp_path / "m.pt")
    assert loaded.n_clusters_ == est.n_clusters_ and (loaded.predict(x) == est.predict(x)).all()


def test_default_range_follows_the_number_of_images():
    assert k_range(681) == (2, 34) and k_range(15_000) == (2, 50) and k_range(30) == (2, 2)
    assert k_range(300, k_min=20) == (20, 20)  # a default k_max is never below the k_min given


@pytest.mark.parametrize("params, message", [
    ({"k_min": 6, "k_max": 4}, "k_min=6 is larger than k_max=4"),
    ({"k_max": 61}, "k_max=61 is larger than the number of samples (60)"),
    ({"k_min": 61}, "k_min=61 is larger than the number of samples (60)"),
])
def test_a_bad_range_is_refused_before_any_work(params, message):
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SP2OTClustering(None, device="cpu", **params).fit(x)


@pytest.mark.parametrize("argv, message", [
    (["--k-min", "5", "--k-max", "3"], "--k-min 5 is larger than --k-max 3"),
    (["--k-max", "61"], "k_max=61 is larger than the number of samples (60)"),
    (["-k", "3", "--k-max", "5"], "either -k"),
    (["--k-min", "1"], "'k_min' parameter"),  # scikit-learn's parameter check
])
def test_cli_refuses_a_bad_range_with_a_message_and_writes_nothing(tmp_path, capsys, argv, message):
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32))
    out = tmp_path / "labels.csv"
    assert main(["cluster", str(tmp_path / "f.npy"), "-o", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


def test_cli_without_k_prints_the_choice_and_writes_the_flag_columns(tmp_path, capsys):
    import csv

    x, _ = long_tailed_mixture(k=4, n_max=60, seed=3)
    x = np.concatenate([x, x[:1], -x[1:2] * 4])  # an exact copy of row 0 and a far point
    np.save(tmp_path / "f.npy", x)
    out = tmp_path / "labels.csv"
    assert main(["cluster", str(tmp_path / "f.npy"), "-o", str(out), "--quiet", "--epochs", "1",
                 "--init", "spectral", "--k-max", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "K = 4 chosen in 2..8 by modularity" in printed
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    n = len(x)
    assert rows[n - 2]["duplicate_of"] == "0" and rows[0]["duplicate_of"] == ""
    assert rows[n - 1]["outlier"] == "true" and float(rows[n - 1]["outlier_score"]) > OUTLIER_THRESHOLD


# ------------------------------------------------------------------------------ flags
def test_an_injected_far_point_is_the_outlier_and_members_are_not():
    x, y = long_tailed_mixture(seed=4)
    rng = np.random.default_rng(0)
    far = rng.standard_normal((1, x.shape[1])).astype(np.float32)  # a direction no cluster has
    scores = outlier_scores(np.concatenate([x, far]), np.r_[y, 0])
    assert scores[-1] > OUTLIER_THRESHOLD and scores[-1] == scores.max()
    assert (scores[:-1] > OUTLIER_THRESHOLD).mean() < 0.01  # members: the rare tail of a normal spread


def test_duplicate_of_points_copies_to_the_first_of_their_group():
    x, _ = long_tailed_mixture(k=3, n_max=60, noise=0.2, seed=5)
    rng = np.random.default_rng(1)
    near = x[10] + 0.002 * rng.standard_normal(x.shape[1]).astype(np.float32)
    x = np.concatenate([x, x[3:4], near[None], x[3:4]])  # exact, near, and a second exact copy
    n = len(x)
    dup = duplicate_of(knn_graph(x, k=10, kernel="cosine"), threshold=0.999)
    assert dup[n - 3] == 3 and dup[n - 2] == 10 and dup[n - 1] == 3  # the earliest image of the group
    assert (dup[:n - 3] == -1).all()  # distinct images (cos < 0.999 here) are not flagged


def scene(seed: int, size: int = 96):
    """A photo-like RGB image: a smooth gradient with blurred coloured shapes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = np.outer(ramp, rng.uniform(40, 200, 3))[:, None, :] + np.outer(ramp, rng.uniform(0, 60, 3))[None, :, :]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 20, 2)
        w, h = rng.integers(12, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def reencoded_and_resized(img, quality: int = 75, scale: float = 0.8):
    import io

    from PIL import Image

    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_the_perceptual_hash_keeps_a_reencoded_resized_copy_close_and_distinct_images_apart():
    originals = [scene(s) for s in range(12)]
    hashes = np.array([perceptual_hash(im) for im in originals], dtype=np.uint64)
    copies = np.array([perceptual_hash(reencoded_and_resized(im)) for im in originals], dtype=np.uint64)
    assert (hamming(hashes, copies) <= DUPLICATE_MAX_HAMMING).all()
    i, j = np.triu_indices(len(originals), k=1)
    assert hamming(hashes[i], hashes[j]).min() > DUPLICATE_MAX_HAMMING


def test_duplicate_of_joins_a_look_alike_pair_through_the_hash_only():
    import scipy.sparse as sp

    original, other = scene(20), scene(21)
    hashes = np.array([perceptual_hash(im) for im in (original, reencoded_and_resized(original), other)],
                      dtype=np.uint64)
    look_alike = (DUPLICATE_HASH_THRESHOLD + DUPLICATE_THRESHOLD) / 2  # too low for the features alone
    graph = sp.csr_matrix(np.array([[0, look_alike, look_alike], [look_alike, 0, look_alike],
                                    [look_alike, look_alike, 0]], dtype=np.float32))
    assert (duplicate_of(graph) == -1).all()
    assert duplicate_of(graph, hashes=hashes).tolist() == [-1, 0, -1]  # the copy, not the other image
    below = graph.copy()
    below.data[:] = DUPLICATE_HASH_THRESHOLD - 0.01  # equal hashes do not outvote far features
    assert (duplicate_of(below, hashes=hashes[[0, 0, 0]]) == -1).all()


def test_a_fit_on_images_hashes_the_decoded_images_and_flags_a_reencoded_copy(tmp_path):
    from PIL import Image

    for s in range(11):
        scene(30 + s).save(tmp_path / f"img_{s:02d}.png")
    reencoded_and_resized(scene(30), quality=90, scale=0.9).save(tmp_path / "img_11.jpg")
    est = SP2OTClustering(3, epochs=1, batch_size=6, input_size=64, random_state=0).fit(tmp_path)
    unit = est.features_ / np.linalg.norm(est.features_, axis=1, keepdims=True)
    assert float(unit[0] @ unit[11]) < DUPLICATE_THRESHOLD  # the features alone would not flag the copy
    assert est.image_hashes_.dtype == np.uint64 and len(est.image_hashes_) == 12
    expected = [perceptual_hash(Image.open(tmp_path / name).convert("RGB")) for name in est.filenames_]
    assert est.image_hashes_.tolist() == [int(h) for h in expected]
    assert est.filenames_[int(est.duplicate_of_[11])] == "img_00.png"
    assert (est.duplicate_of_[:11] == -1).all()
    on_features = SP2OTClustering(3, epochs=1, batch_size=6, random_state=0).fit(est.features_)
    assert on_features.image_hashes_ is None


def test_a_saved_model_scores_new_samples_by_the_fits_outlier_rule(tmp_path):
    x, _ = long_tailed_mixture(k=3, n_max=80, seed=6)
    est = SP2OTClustering(3, epochs=1, batch_size=64, bank_batches=2, knn=5, device="cpu").fit(x)
    est.save(tmp_path / "m.pt")
    model = SP2OTClustering.load(tmp_path / "m.pt")
    far = np.random.default_rng(2).standard_normal((1, x.shape[1])).astype(np.float32)
    out = model.predict_assignments(np.concatenate([x[:20], far]))
    # the fit's own images score as they did in the fit; a point far from every cluster is flagged
    np.testing.assert_allclose(out.outlier_scores[:20], est.outlier_scores_[:20], rtol=1e-5, atol=1e-6)
    assert out.outliers[-1] and not out.outliers[:20].any()
