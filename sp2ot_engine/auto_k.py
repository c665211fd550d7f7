r"""Choosing the number of clusters ``K`` on the cosine kNN graph of the frozen features.

Used by :class:`sp2ot_engine.clustering.SP2OTClustering` when ``n_clusters=None``: ``K`` is
chosen once, before training, from the graph the graph starts need anyway, so it costs one
eigen-solve and a few silhouettes. Every criterion returns a curve ``{K: value}`` over
``k_min..k_max`` and the ``K`` it picks (the largest value; ties to the smaller ``K``).

* ``"eigengap"`` -- the gap ``lambda_{K+1} - lambda_K`` of the normalised graph Laplacian
  ``I - D^{-1/2} W D^{-1/2}`` (``W`` the symmetrised, non-negative graph), the classical
  count of well-separated blocks (von Luxburg 2007, section 8.3).
* ``"silhouette"`` -- the mean cosine silhouette of the spectral partition into ``K`` (the
  first ``K`` eigenvectors, assigned by column-pivoted QR as in
  :func:`sp2ot_engine.starts.spectral_partition`), on a fixed sample. Every point counts once,
  so the head classes dominate and merging two small classes costs little.
* ``"silhouette-macro"`` -- the same partitions scored by the mean over clusters of each
  cluster's mean silhouette: a tail cluster weighs as much as a head cluster, which removes
  the size bias of the point average on long-tailed data.
* ``"modularity"`` -- the same partitions scored on the graph itself by Newman's modularity
  ``Q = sum_c [ W_cc / 2m - (d_c / 2m)^2 ]`` (``W_cc`` the weight inside cluster ``c``, ``d_c``
  its total degree, ``2m`` the total weight) of the symmetrised graph of each point's
  :data:`MODULARITY_LINKS` most similar neighbours (the ToMATo start's links): the share of
  edges kept inside the clusters above what clusters of the same degrees would keep at random.
  A small class that is a dense block of the graph raises ``Q`` however few points it has,
  where a silhouette averages it away. The default: on the four long-tailed development sets
  (10 classes each) the silhouettes choose 2 to 7 clusters and the eigengap 4 to 10, modularity
  10 to 14 (``benchmarks/auto_k.py`` and ``benchmarks/README.md``).

All take the graph of :func:`sp2ot_engine.graph.knn_graph` with ``kernel="cosine"``
(``N x N`` CSR, values ``cos(f_i, f_j)``). :func:`k_range` (the range checks the API repeats
when a job is created) imports nothing but the standard library; numpy and scipy are imported
by the functions that compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sp2ot_engine.options import K_CRITERIA

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import scipy.sparse as sp

__all__ = [
    "K_CRITERIA",
    "KChoice",
    "choose_k",
    "default_k_range",
    "k_range",
    "qr_partition",
    "spectral_eigenpairs",
]

#: At most this many clusters are tried by default: one eigenvector each in one solve.
K_MAX_CAP = 50
#: A cluster worth proposing has at least this many images on average (sets the default ``k_max``).
MIN_IMAGES_PER_CLUSTER = 20
#: Neighbours per point in the graph modularity is computed on (the densest of the kNN graph's).
MODULARITY_LINKS = 10
#: Points the silhouettes are computed on (one fixed sample: the ``K`` compared on the same points).
SILHOUETTE_SAMPLE = 3000


@dataclass
class KChoice:
    """The chosen ``k``, the criterion's value per tried ``K`` and the criterion's name."""

    k: int
    curve: dict[int, float]
    criterion: str


def default_k_range(n_samples: int) -> tuple[int, int]:
    """``(k_min, k_max) = (2, clip(N // 20, 2, 50))``: every ``K`` whose clusters average at
    least :data:`MIN_IMAGES_PER_CLUSTER` images, at most :data:`K_MAX_CAP` (one eigenvector per
    ``K`` in the solve)."""
    return 2, int(min(K_MAX_CAP, max(2, n_samples // MIN_IMAGES_PER_CLUSTER)))


def check_k_range(k_min: int, k_max: int, n_samples: int, samples: str = "samples") -> None:
    """Raise ``ValueError`` saying what to change when ``2 <= k_min <= k_max <= N`` does not
    hold (``samples``: what the ``N`` things are called in the message)."""
    if k_min < 2:
        raise ValueError(f"k_min={k_min} must be at least 2")
    if k_min > n_samples:
        raise ValueError(f"k_min={k_min} is larger than the number of {samples} ({n_samples}): "
                         f"give k_min <= {n_samples}")
    if k_min > k_max:
        raise ValueError(f"k_min={k_min} is larger than k_max={k_max}: give k_min <= k_max")
    if k_max > n_samples:
        raise ValueError(f"k_max={k_max} is larger than the number of {samples} ({n_samples}): "
                         f"give k_max <= {n_samples}")


def k_range(n_samples: int, k_min: int | None = None, k_max: int | None = None,
            samples: str = "samples") -> tuple[int, int]:
    """The checked ``(k_min, k_max)`` for ``n_samples``: the bounds given, the defaults of
    :func:`default_k_range` for the others (a default ``k_max`` is at least ``k_min``)."""
    lo, hi = default_k_range(n_samples)
    k_min = int(k_min) if k_min is not None else lo
    k_max = int(k_max) if k_max is not None else max(hi, k_min)
    check_k_range(k_min, k_max, n_samples, samples)
    return k_min, k_max


def _normalised_affinity(graph: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """``D^{-1/2} W D^{-1/2}`` of ``W = max(S, 0) + max(S, 0)^T`` (diagonal zero), and ``D^{-1/2}``."""
    import numpy as np
    import scipy.sparse as sp

    w = graph.maximum(0).tocsr()
    w = (w + w.T).tocsr()
    w.setdiag(0)
    w.eliminate_zeros()
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    d = sp.diags(inv_sqrt)
    return (d @ w @ d).tocsr(), inv_sqrt


def spectral_eigenpairs(graph: sp.csr_matrix, n_vectors: int, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_vectors`` smallest eigenvalues of the normalised Laplacian (ascending) and the
    matching eigenvectors of the random-walk Laplacian (``N x n_vectors``, ``D^{-1/2} u``).

    ARPACK (``eigsh``) on the largest eigenpairs of ``D^{-1/2} W D^{-1/2}`` (``lambda = 1 -
    mu``), started from ``D^{1/2} 1`` (the known top eigenvector, so the result does not depend
    on a random start): 2.6 s for 51 pairs on the 14,886-node Fashion-MNIST-LT graph, where LOBPCG
    took 130 s. ``numpy.linalg.eigh`` on small graphs (``N < 5 n_vectors``: a dense solve).
    ``random_state`` is kept for callers and unused.
    """
    from scipy.sparse.linalg import eigsh

    import numpy as np

    a, inv_sqrt = _normalised_affinity(graph)
    n = a.shape[0]
    m = int(min(n_vectors, n))
    if n < 5 * m:  # LOBPCG wants a block much smaller than the matrix: a dense solve is cheap here
        mu, u = np.linalg.eigh(a.toarray())
        mu, u = mu[-m:], u[:, -m:]
    else:
        mu, u = eigsh(a, k=m, which="LA", tol=1e-6, v0=1.0 / inv_sqrt)
    order = np.argsort(-mu)
    lam = 1.0 - np.asarray(mu)[order]
    vectors = np.asarray(u)[:, order] * inv_sqrt[:, None]
    return np.clip(lam, 0.0, 2.0), vectors


def qr_partition(vectors: np.ndarray) -> np.ndarray:
    """Labels ``0..K-1`` of the ``N x K`` spectral embedding by column-pivoted QR (Damle, Minden
    & Ying 2019): the ``K`` pivot rows define an orthogonal rotation; each point goes to the
    column of largest absolute value after it. Deterministic, no k-means."""
    import numpy as np
    from scipy.linalg import qr, svd

    k = vectors.shape[1]
    _, _, pivots = qr(vectors.T, pivoting=True, mode="economic")
    left, _, right = svd(vectors[pivots[:k], :].T)
    return np.abs(vectors @ (left @ right)).argmax(axis=1).astype(np.int64)


def _densest_links(graph: sp.csr_matrix, links: int) -> sp.csr_matrix:
    """The graph with only each row's ``links`` largest entries (all of them when it has fewer)."""
    import numpy as np
    import scipy.sparse as sp

    counts = np.diff(graph.indptr)
    n, k = graph.shape[0], int(counts.max()) if len(counts) else 0
    if k <= links or counts.min() != k:
        return graph
    ids = graph.indices.reshape(n, k)
    values = np.asarray(graph.data).reshape(n, k)
    keep = np.argsort(-values, axis=1, kind="stable")[:, :links]
    return sp.csr_matrix((np.take_along_axis(values, keep, axis=1).ravel(),
                          (np.repeat(np.arange(n), links), np.take_along_axis(ids, keep, axis=1).ravel())),
                         shape=graph.shape)


def _modularity_curve(graph: sp.csr_matrix, vectors: np.ndarray, ks: range) -> dict[int, float]:
    import numpy as np
    import scipy.sparse as sp

    w = _densest_links(graph, MODULARITY_LINKS).maximum(0).tocsr()
    w = (w + w.T).tocsr()
    w.setdiag(0)
    w.eliminate_zeros()
    degree = np.asarray(w.sum(axis=1)).ravel()
    total = float(degree.sum())
    n = w.shape[0]
    curve = {}
    for k in ks:
        labels = qr_partition(vectors[:, :k])
        member = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))  # K x N one-hot
        inside = float((member @ w).multiply(member).sum()) / total
        share = (member @ degree) / total
        curve[k] = inside - float(np.sum(share ** 2))
    return curve


def _silhouette_curve(features: np.ndarray, vectors: np.ndarray, ks: range, macro: bool,
                      random_state: int) -> dict[int, float]:
    import numpy as np
    from sklearn.metrics import silhouette_samples

    n = features.shape[0]
    rows = np.arange(n)
    if n > SILHOUETTE_SAMPLE:
        rows = np.sort(np.random.default_rng(random_state).choice(n, SILHOUETTE_SAMPLE, replace=False))
    x = np.asarray(features[rows], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)  # the sample's cosine distances, computed once for every K
    np.fill_diagonal(dist, 0.0)
    curve = {}
    for k in ks:
        labels = qr_partition(vectors[:, :k])[rows]
        present = np.unique(labels)
        if present.size < 2:
            curve[k] = -1.0
            continue
        s = silhouette_samples(dist, labels, metric="precomputed")
        curve[k] = float(np.mean([s[labels == c].mean() for c in present]) if macro else s.mean())
    return curve


def choose_k(graph: sp.csr_matrix, features: np.ndarray, k_min: int, k_max: int, *,
             criterion: str = K_CRITERIA[0], random_state: int = 0,
             eigenpairs: tuple[np.ndarray, np.ndarray] | None = None) -> KChoice:
    """The ``K`` in ``k_min..k_max`` the criterion scores highest (see the module docstring),
    with the criterion's curve. ``features``: the ``N x d`` features the graph was built on
    (the silhouettes use them; the eigengap does not). ``eigenpairs``: the result of
    :func:`spectral_eigenpairs` with at least ``k_max + 1`` vectors, when the caller has it
    (several criteria compared on one solve)."""
    if criterion not in K_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(K_CRITERIA)}")
    check_k_range(k_min, k_max, graph.shape[0])
    n_vectors = min(k_max + 1, graph.shape[0])
    lam, vectors = eigenpairs if eigenpairs is not None else spectral_eigenpairs(graph, n_vectors, random_state)
    ks = range(k_min, min(k_max, vectors.shape[1]) + 1)
    if criterion == "eigengap":
        curve = {k: float(lam[k] - lam[k - 1]) if k < len(lam) else 0.0 for k in ks}
    elif criterion == "modularity":
        curve = _modularity_curve(graph, vectors, ks)
    else:
        curve = _silhouette_curve(features, vectors, ks, criterion == "silhouette-macro", random_state)
    best = max(curve, key=lambda k: (curve[k], -k))
    return KChoice(int(best), curve, criterion)
