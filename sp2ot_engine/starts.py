r"""Starting partitions for the cluster head, found on the kNN graph of the frozen features.

SP2OT's training keeps the partition it starts from: started at the true class means of
Fashion-MNIST-LT it stays at 79 ACC, started at random or at k-means' centroids it settles into
k-means' partition (the largest class split in three, the small ones merged), 40 ACC
(``benchmarks/README.md``). k-means minimises within-cluster scatter, which favours clusters of
equal size. The partitions here come from the cosine kNN graph instead and carry no such size
prior; the head starts at their cluster means and SP2OT refines it.

* :func:`density_modes` -- ToMATo (Chazal, Guibas, Oudot & Skraba 2013): mode seeking on the
  graph with a kNN density estimate, keeping the ``K`` most persistent modes. A large class
  with one dense core stays one cluster however many points it has; a small class separated by
  a low-density gap keeps its own mode.
* :func:`spectral_partition` -- normalised spectral clustering of the symmetrised graph
  (Shi & Malik 2000; ``cluster_qr`` assignment, Damle, Minden & Ying 2019).
* :func:`partition_means` -- unit-norm cluster means, the head's starting prototypes.
* :func:`mean_silhouette` -- the label-free criterion that picks between refined candidates.

All functions take the graph built by :func:`sp2ot_engine.graph.knn_graph` with
``kernel="cosine"``: ``N x N`` CSR, ``k`` entries per row, values ``cos(f_i, f_j)``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
    "FewModes",
    "density_modes",
    "mean_silhouette",
    "partition_means",
    "spectral_partition",
]

#: Neighbours per row of the ToMATo graph (the densest ``k_link`` of the kNN graph's ``k``).
DEFAULT_K_LINK = 10
#: Silhouettes are computed on at most this many points (``O(n^2 d)``: ~4 s for 8,000 x 1,280).
SILHOUETTE_SAMPLE = 8000


class FewModes(ValueError):
    """The graph has fewer than ``K`` density modes (or connected pieces) to keep."""


def _sorted_neighbours(graph: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour ids and cosine similarities of each row, most similar first (``N x k``)."""
    n = graph.shape[0]
    counts = np.diff(graph.indptr)
    if n == 0 or counts.min() != counts.max() or counts[0] == 0:
        raise ValueError("graph must have the same number (>= 1) of neighbours in every row, "
                         "as sp2ot_engine.graph.knn_graph builds it")
    k = int(counts[0])
    ids = graph.indices.reshape(n, k).astype(np.int64)
    sims = np.asarray(graph.data, dtype=np.float64).reshape(n, k)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def density_modes(graph: sp.csr_matrix, n_clusters: int, *, k_link: int = DEFAULT_K_LINK) -> np.ndarray:
    r"""ToMATo clustering of the kNN graph into ``n_clusters`` density modes.

    Density: ``log p_i = -log mean_{j in kNN(i)} ||u_i - u_j||^2`` with ``u`` the unit-norm
    features, so ``||u_i - u_j||^2 = 2 - 2 cos(f_i, f_j)`` comes from the graph's values.
    Points are linked to their ``k_link`` most similar neighbours; ToMATo walks them by
    decreasing density, attaching each to the mode of its densest linked neighbour and merging
    two modes when their saddle is reached, the lower mode dying with persistence
    ``p_peak - p_saddle``; the ``n_clusters`` most persistent modes are kept (``gudhi``). When
    the linked graph has fewer than ``K`` modes, it is retried with 5 and then 3 links (a
    sparser graph has more modes).

    Args:
        graph: cosine kNN graph (``N x N`` CSR, ``k`` entries per row).
        n_clusters: ``K``.
        k_link: neighbours per point in the ToMATo graph (``<= k``).

    Returns:
        ``N`` labels in ``0..K-1``.

    Raises:
        FewModes: fewer than ``K`` modes even with 3 links, or more than ``K`` unconnected
            pieces (callers use another start).
    """
    from gudhi.clustering.tomato import Tomato

    ids, sims = _sorted_neighbours(graph)
    log_density = -np.log(np.maximum(np.mean(2.0 - 2.0 * sims, axis=1), 1e-12))
    links = sorted({min(int(k_link), ids.shape[1]), min(5, ids.shape[1]), min(3, ids.shape[1])}, reverse=True)
    n_modes = 0
    for n_links in links:
        tomato = Tomato(graph_type="manual", density_type="manual")
        tomato.fit(ids[:, :n_links].tolist(), weights=log_density)
        n_modes = int(tomato.n_leaves_)
        if n_modes < n_clusters:
            continue
        tomato.n_clusters_ = int(n_clusters)  # merges the least persistent modes away
        labels = np.asarray(tomato.labels_, dtype=np.int64)
        if labels.max() + 1 == n_clusters and np.bincount(labels, minlength=n_clusters).min() > 0:
            return labels
        # more connected pieces than K: modes in different pieces never merge
        raise FewModes(f"the kNN graph falls into more than {n_clusters} unconnected pieces")
    raise FewModes(f"the kNN graph has fewer than {n_clusters} density modes ({n_modes} with {links[-1]} links)")


def spectral_partition(graph: sp.csr_matrix, n_clusters: int, random_state: int | None = 0) -> np.ndarray:
    r"""Normalised spectral clustering of ``W = max(S, 0) + max(S, 0)^T`` (diagonal zero).

    The ``K`` leading eigenvectors of ``D^{-1/2} W D^{-1/2}`` are assigned to clusters by
    column-pivoted QR (``cluster_qr``: no k-means, no restarts), so the labels depend on the
    seed only through the eigensolver's start vector (LOBPCG).

    Raises:
        FewModes: the graph has more connected pieces than ``K`` can hold apart, or a cluster
            came out empty.
    """
    from sklearn.cluster import SpectralClustering

    w = graph.maximum(0).tocsr()
    w = (w + w.T).tocsr()
    w.setdiag(0)
    w.eliminate_zeros()
    # LOBPCG: the same eigenvectors as ARPACK here, 8x faster on a 15k-node graph (5.7 s vs 47 s)
    sc = SpectralClustering(int(n_clusters), affinity="precomputed", assign_labels="cluster_qr",
                            eigen_solver="lobpcg", random_state=random_state)
    labels = np.asarray(sc.fit_predict(w), dtype=np.int64)
    if np.bincount(labels, minlength=n_clusters).min() == 0:
        raise FewModes("spectral clustering left a cluster empty")
    return labels


def partition_means(features: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Unit-norm mean of each cluster's unit-norm features (``K x d`` float32)."""
    x = np.asarray(features, dtype=np.float32)
    inv_norms = 1.0 / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
    # sum of unit rows per cluster without a normalised copy of x: the 1/|x_i| go into the one-hot
    onehot = sp.csr_matrix((inv_norms.astype(np.float32), (labels, np.arange(len(labels)))),
                           shape=(int(n_clusters), len(labels)))
    sums = np.asarray(onehot @ x, dtype=np.float32)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a cluster of the partition is empty or its features cancel out")
    return sums / norms


def mean_silhouette(features: np.ndarray, labels: np.ndarray, random_state: int = 0) -> float:
    """Mean cosine silhouette of the labels (on a random sample of at most ``SILHOUETTE_SAMPLE`` points)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if len(labels) > SILHOUETTE_SAMPLE:
        rows = np.sort(np.random.default_rng(random_state).choice(len(labels), SILHOUETTE_SAMPLE, replace=False))
    if len(np.unique(labels[rows])) < 2:
        return -1.0
    return float(silhouette_score(_unit_rows(np.asarray(features)[rows]), labels[rows], metric="cosine"))


def _unit_rows(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
