"""The estimator: scikit-learn conventions (the full check suite is in
test_sklearn_conformance.py), imbalanced clustering quality on separable data, persistence,
progress, cancellation, bad input, no global random state touched, input from a manifest."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sp2ot_engine import Cancelled, SP2OTClustering
from sp2ot_engine.metrics import evaluate
from test_starts import long_tailed_mixture  # a wide head class and three compact tail classes


def long_tailed_blobs(sizes=(300, 120, 50, 20), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 4
    x = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return x.astype(np.float32), y


@pytest.fixture(autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_estimator_conventions():
    est = SP2OTClustering(5, epochs=3, formulation="p2ot")
    params = est.get_params()
    assert params["n_clusters"] == 5 and params["formulation"] == "p2ot"
    assert clone(est).get_params() == params
    with pytest.raises(ValueError, match="not fitted"):
        est.predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not fitted"):
        est.save("never-written.pt")


@pytest.mark.parametrize("formulation", ["sp2ot", "p2ot"])
def test_recovers_long_tailed_clusters(formulation):
    x, y = long_tailed_blobs()
    est = SP2OTClustering(4, epochs=15, batch_size=128, formulation=formulation, lr=5e-3, random_state=0)
    labels = est.fit_predict(x)
    m = evaluate(y, labels)
    assert m["acc"] > 0.9, m  # including the 20-sample tail cluster
    assert est.labels_.shape == (len(x),) and est.confidences_.shape == (len(x),)
    assert ((est.confidences_ >= 0) & (est.confidences_ <= 1)).all()
    assert est.cluster_sizes_.sum() == len(x) and len(est.cluster_sizes_) == 4
    assert est.filenames_[:2] == ["0", "1"] and est.skipped_ == []
    assert len(est.history_) == 15 and {"epoch", "loss", "rho"} <= set(est.history_[0])
    assert est.history_[-1]["rho"] > est.history_[0]["rho"]  # the curriculum ramps up


def test_deterministic_on_cpu_and_predict_after_load(tmp_path):
    x, _ = long_tailed_blobs(seed=1)
    a = SP2OTClustering(4, epochs=3, batch_size=64, random_state=3).fit(x)
    b = SP2OTClustering(4, epochs=3, batch_size=64, random_state=3).fit(x)
    assert np.array_equal(a.labels_, b.labels_)
    # a RandomState seeded alike gives the same draws each time
    c = SP2OTClustering(4, epochs=3, batch_size=64, random_state=np.random.RandomState(5)).fit(x)
    d = SP2OTClustering(4, epochs=3, batch_size=64, random_state=np.random.RandomState(5)).fit(x)
    assert np.array_equal(c.labels_, d.labels_)
    path = tmp_path / "model.pt"
    a.save(path)
    loaded = SP2OTClustering.load(path)
    assert loaded.random_state == 3
    assert np.array_equal(loaded.predict(x), a.predict(x))
    with pytest.raises(ValueError, match="features"):
        loaded.predict(np.zeros((3, 5)))
    c.save(path)  # a RandomState is not a plain value: saved as None
    assert SP2OTClustering.load(path).random_state is None


def test_model_files_saved_with_seed_still_load(tmp_path):
    x, _ = long_tailed_blobs(seed=1)
    a = SP2OTClustering(4, epochs=1, batch_size=64, random_state=7).fit(x)
    path = tmp_path / "old.pt"
    a.save(path)
    state = torch.load(path, weights_only=True)
    state["params"]["seed"] = state["params"].pop("random_state")  # the format before random_state
    torch.save(state, path)
    loaded = SP2OTClustering.load(path)
    assert loaded.random_state == 7 and np.array_equal(loaded.predict(x), a.labels_)


def test_fit_and_predict_leave_the_global_random_state_alone():
    """No global seeding: fit draws from generators of its own; predict changes nothing."""
    x, _ = long_tailed_blobs()
    torch_before, numpy_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    est = SP2OTClustering(4, epochs=2, batch_size=128, random_state=1).fit(x)
    state = dict(vars(est))
    est.predict(x)
    assert torch.equal(torch.get_rng_state(), torch_before) and np.array_equal(np.random.get_state()[1], numpy_before)
    assert vars(est).keys() == state.keys() and all(vars(est)[k] is v for k, v in state.items())


def test_progress_and_cancel():
    x, _ = long_tailed_blobs()
    seen = []
    SP2OTClustering(4, epochs=2, batch_size=128).fit(x, progress=seen.append)
    stages = [s["stage"] for s in seen]
    assert stages[0] == "graph" and stages[-1] == "done" and "training" in stages
    assert all({"stage", "percent", "epoch", "loss", "rho"} <= set(s) for s in seen)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        SP2OTClustering(4, epochs=5, batch_size=64).fit(x, should_stop=stop)


@pytest.mark.parametrize(
    "kwargs,x,match",
    [
        # parameters are checked by scikit-learn's _parameter_constraints (its wording)
        ({"n_clusters": 1}, np.zeros((10, 2)), r"'n_clusters' parameter of SP2OTClustering must be an int in the "
                                               r"range \[2, inf\)"),
        ({"n_clusters": 20}, np.random.default_rng(0).normal(size=(10, 2)), "at most 10 clusters"),
        ({"n_clusters": 3, "mode": "slow"}, np.zeros((10, 2)),
         "'mode' parameter of SP2OTClustering must be a str among"),
        ({"n_clusters": 3, "formulation": "sela"}, np.zeros((10, 2)), "'formulation' parameter .* must be a str among"),
        ({"n_clusters": 3}, np.zeros((2, 2, 2)), "Found array with dim 3"),
        ({"n_clusters": 3}, np.full((10, 2), np.nan), "NaN"),
        ({"n_clusters": 3, "device": "cuda:7"}, np.zeros((10, 2)), "CUDA"),
    ],
)
def test_bad_input(kwargs, x, match):
    if "device" in kwargs and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(ValueError, match=match):
        SP2OTClustering(**kwargs).fit(x)


def test_bad_image_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SP2OTClustering(3).fit(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable image"):
        SP2OTClustering(3).fit(tmp_path)


def test_full_mode_fine_tunes_the_last_block_on_images(tmp_path):
    from PIL import Image

    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 210)]
    for i in range(18):
        img = Image.new("RGB", (24, 24), colours[i % 3])
        img.save(tmp_path / f"img_{i:02d}.png")
    est = SP2OTClustering(3, mode="full", epochs=2, batch_size=6, input_size=64, formulation="p2ot", random_state=0)
    torch_before = torch.get_rng_state()
    est.fit(tmp_path)
    # torchvision's augmentations draw from torch's global generator: seeded in a fork of it
    assert torch.equal(torch.get_rng_state(), torch_before)
    again = SP2OTClustering(3, mode="full", epochs=2, batch_size=6, input_size=64, formulation="p2ot",
                            random_state=0).fit(tmp_path)
    assert np.array_equal(again.labels_, est.labels_)
    assert len(est.labels_) == 18 and est.filenames_[0] == "img_00.png"
    assert est.encoder_state_ is not None  # the fine-tuned backbone is kept with the model
    # one full-mode training, of the start that won when both were trained in fast mode first
    assert set(est.start_scores_) == {"density", "spectral"}, est.start_notes_
    assert any("trained in fast mode first" in note and est.start_ in note for note in est.start_notes_)
    groups = [{int(est.labels_[i]) for i in range(g, 18, 3)} for g in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3, groups


@pytest.mark.parametrize("n, k, seed", [(3000, 10, 0), (3000, 10, 5), (1500, 10, 1)])
def test_spherical_kmeans_samples_like_faiss(n, k, seed):
    """Only faiss' own training subset is normalised (no normalised copy of all N rows), and the
    centroids are exactly those of faiss on all the normalised rows."""
    import faiss

    from sp2ot_engine.clustering import spherical_kmeans

    x, _ = long_tailed_blobs(sizes=(n // 2, n // 4, n // 4), dim=8, seed=seed)
    full = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    km = faiss.Kmeans(8, k, niter=25, nredo=5, seed=seed, spherical=True, verbose=False)
    km.train(full)
    np.testing.assert_array_equal(spherical_kmeans(torch.from_numpy(x), k, seed).numpy(), km.centroids)


def test_fit_from_a_manifest_or_a_collection_and_predict_images(tmp_path):
    """The worker's input: a manifest written when the upload was checked, read without a
    scan; images whose pixel data is damaged (headers fine) are skipped when decoded once."""
    import io
    import zipfile

    from PIL import Image

    from sp2ot_engine.io.archive import inspect_archive, manifest_path
    from sp2ot_engine.io.collection import ImageCollection

    def jpeg(colour) -> bytes:
        buf = io.BytesIO()
        Image.effect_noise((32, 32), 20).convert("RGB").point(lambda v: v // 4).save(buf, "JPEG")
        im = Image.new("RGB", (32, 32), colour)
        im.paste(Image.open(buf), (8, 8))
        out = io.BytesIO()
        im.save(out, "JPEG")
        return out.getvalue()

    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 210)]
    arc = tmp_path / "upload.zip"
    with zipfile.ZipFile(arc, "w") as z:
        for i in range(9):
            z.writestr(f"img_{i}.jpg", jpeg(colours[i % 3]))
        noise = io.BytesIO()
        Image.effect_noise((64, 64), 50).convert("RGB").save(noise, "JPEG")
        z.writestr("cut.jpg", noise.getvalue()[: len(noise.getvalue()) // 2])
    manifest = inspect_archive(arc)
    assert len(manifest.members) == 10  # the header of cut.jpg is intact
    manifest.write(manifest_path(arc))
    options = dict(epochs=2, batch_size=4, input_size=32, formulation="p2ot", random_state=0)
    est = SP2OTClustering(3, **options).fit(str(manifest_path(arc)))
    assert est.filenames_ == [f"img_{i}.jpg" for i in range(9)] and dict(est.skipped_).keys() == {"cut.jpg"}
    with ImageCollection.from_manifest(arc, manifest, verify=True) as collection:
        again = SP2OTClustering(3, **options).fit(collection)
        assert np.array_equal(again.labels_, est.labels_)
        names, labels = again.predict_images(collection)  # the caller's collection stays open
    assert names == est.filenames_ and np.array_equal(labels, est.predict(arc))
    with pytest.raises(ValueError, match="predict_images takes images"):
        est.predict_images(np.zeros((3, 2)))


def test_default_start_finds_the_tail_that_a_kmeans_start_keeps_merged():
    """What the quality study found, at small scale: training keeps the partition it starts
    from; from k-means' centroids it keeps the head class split and the tail merged, from the
    default graph start it recovers the tail classes."""
    x, y = long_tailed_mixture(0)
    params = dict(formulation="p2ot", epochs=5, batch_size=512, random_state=0)
    from_kmeans = evaluate(y, SP2OTClustering(4, init="kmeans", **params).fit_predict(x))
    default = SP2OTClustering(4, **params).fit(x)
    found = evaluate(y, default.labels_)
    assert from_kmeans["acc"] < 0.75, from_kmeans
    assert found["acc"] > 0.9 and found["tail_acc"] > 0.9, found
    assert default.start_ in ("density", "spectral") and set(default.start_scores_) == {"density", "spectral"}


def test_default_gives_the_same_clusters_from_every_seed():
    from sklearn.metrics import adjusted_rand_score

    x, _ = long_tailed_mixture(1)
    labels = [SP2OTClustering(4, formulation="p2ot", epochs=5, random_state=s).fit_predict(x) for s in (0, 1, 2)]
    assert adjusted_rand_score(labels[0], labels[1]) > 0.99
    assert adjusted_rand_score(labels[0], labels[2]) > 0.99


def test_graph_starts_fall_back_and_say_so():
    rng = np.random.default_rng(0)
    x = np.concatenate([c + 0.01 * rng.normal(size=(30, 8)) for c in np.eye(8)]).astype(np.float32)
    # 8 far-apart blobs, 3 clusters asked: the 5-NN graph has 8 unconnected pieces, no density start
    est = SP2OTClustering(3, knn=5, formulation="p2ot", epochs=2, random_state=0).fit(x)
    assert est.start_ == "spectral"
    assert "density start not used" in " ".join(est.start_notes_)
    zero = x.copy()
    zero[0] = 0.0  # a cosine graph has no edge for an all-zero row
    est = SP2OTClustering(8, formulation="p2ot", epochs=2, random_state=0).fit(zero)
    assert est.start_ == "kmeans" and "all zero" in " ".join(est.start_notes_)


def test_tied_trained_starts_go_to_the_start_with_the_higher_silhouette_before_training():
    from sp2ot_engine.clustering import _best_start

    # (trained silhouette, start silhouette, index, name): the measured Fashion-MNIST test-LT50 tie,
    # whose order flips with the seed, and the Fashion-MNIST-LT win of the density start
    tie = [(0.1418, 0.1063, 0, "density"), (0.1413, 0.1328, 1, "spectral")]
    assert _best_start(tie)[3] == "spectral"
    assert _best_start(tie[::-1])[3] == "spectral"
    win = [(0.2276, 0.1789, 0, "density"), (0.1852, 0.1824, 1, "spectral")]
    assert _best_start(win)[3] == "density"
    assert _best_start([(0.2, 0.1, 0, "spectral")])[3] == "spectral"
