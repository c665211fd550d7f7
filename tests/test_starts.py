"""Starting partitions on the kNN graph (sp2ot_engine.starts)."""
from __future__ import annotations

import numpy as np
import pytest

from sp2ot_engine.graph import knn_graph
from sp2ot_engine.metrics import evaluate
from sp2ot_engine.starts import FewModes, density_modes, mean_silhouette, partition_means, spectral_partition


def long_tailed_mixture(seed: int, sizes=(3000, 300, 100, 40), d: int = 32, spread=(0.45, 0.12, 0.12, 0.12)):
    """A wide head class and three compact tail classes around random unit directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([c + s * rng.normal(size=(n, d)) for c, n, s in zip(centres, sizes, spread)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def spherical_kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    u = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    km = faiss.Kmeans(x.shape[1], k, niter=50, nredo=5, seed=seed, spherical=True)
    km.train(u)
    return km.index.search(u, 1)[1].ravel()


@pytest.mark.parametrize("seed", [0, 1])
def test_graph_starts_recover_the_tail_that_kmeans_merges(seed):
    x, y = long_tailed_mixture(seed)
    graph = knn_graph(x, k=20, kernel="cosine")
    kmeans = evaluate(y, spherical_kmeans_labels(x, 4, seed))
    density = evaluate(y, density_modes(graph, 4))
    spectral = evaluate(y, spectral_partition(graph, 4, seed))
    # k-means spends a centroid on the wide head class and merges tail classes
    assert kmeans["acc"] < 0.7
    for found in (density, spectral):
        assert found["acc"] > 0.95
        assert found["tail_acc"] > 0.9


def test_density_modes_is_deterministic_and_labels_every_point():
    x, _ = long_tailed_mixture(0)
    graph = knn_graph(x, k=20, kernel="cosine")
    a, b = density_modes(graph, 4), density_modes(graph, 4)
    assert np.array_equal(a, b)
    assert a.shape == (len(x),) and set(np.unique(a)) == {0, 1, 2, 3}


def test_density_modes_says_when_there_are_too_few_modes():
    rng = np.random.default_rng(0)
    x = (np.array([1.0, 0, 0, 0]) + 0.05 * rng.normal(size=(200, 4))).astype(np.float32)  # one blob
    graph = knn_graph(x, k=10, kernel="cosine")
    with pytest.raises(FewModes):
        density_modes(graph, 150)


def test_density_modes_rejects_a_graph_with_unequal_rows():
    import scipy.sparse as sp

    g = sp.csr_matrix(np.array([[0, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="same number"):
        density_modes(g, 2)


def test_partition_means_are_unit_means_of_unit_rows():
    x = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-4.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    got = partition_means(x, labels, 2)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = np.stack([u[:2].sum(0), u[2:].sum(0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        partition_means(x, labels, 3)


def test_mean_silhouette_prefers_the_true_split():
    x, y = long_tailed_mixture(0, spread=(0.12, 0.12, 0.12, 0.12))
    shuffled = np.random.default_rng(0).permutation(y)
    assert mean_silhouette(x, y) > 0.3 > 0.0 > mean_silhouette(x, shuffled)
    assert mean_silhouette(x, np.zeros(len(y), dtype=int)) == -1.0


def test_density_modes_says_when_the_graph_has_more_pieces_than_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8)  # 8 far-apart blobs: a 5-NN graph has 8 unconnected pieces
    x = np.concatenate([c + 0.01 * rng.normal(size=(30, 8)) for c in centres]).astype(np.float32)
    graph = knn_graph(x, k=5, kernel="cosine")
    with pytest.raises(FewModes, match="unconnected"):
        density_modes(graph, 3)
    assert len(np.unique(density_modes(graph, 8))) == 8
