r"""Per-image flags of a clustering: outliers and (near-)duplicates.

* :func:`outlier_scores` -- how far each image lies from every cluster. ``d_i = 1 - max_c
  cos(f_i, m_c)``, the cosine distance to the nearest cluster mean ``m_c`` (the unit-norm
  mean of the unit-norm features of cluster ``c``), scored as a robust z-score among the
  images whose nearest mean is the same: ``z_i = (d_i - median_c) / (1.4826 MAD_c)``, the
  modified z-score of Iglewicz & Hoaglin (1993). An image is an outlier when
  ``z_i > OUTLIER_THRESHOLD = 3.5`` (their recommended cut; for normal data it flags about
  0.05 %). A cluster's ``MAD`` is floored at a tenth of the whole set's, so a very tight or a
  tiny cluster does not flag its slightly looser members.
* :func:`duplicate_of` -- for each image, the first (lowest-index) image it duplicates, or
  ``-1``: images joined by an edge of the cosine kNN graph with ``cos >= threshold`` form
  groups (connected components); every member of a group but the first points to the first.
  Exact copies have ``cos = 1``. The default threshold :data:`DUPLICATE_THRESHOLD` was chosen
  with ``benchmarks/near_duplicates.py`` (re-encoded, resized and slightly cropped copies of
  Fashion-MNIST images, EfficientNet-Lite0 features).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["DUPLICATE_THRESHOLD", "OUTLIER_THRESHOLD", "OutlierRule", "duplicate_of", "fit_outlier_rule",
           "outlier_scores"]

#: Modified z-score above which an image is an outlier.
OUTLIER_THRESHOLD = 3.5
#: Cosine similarity of the backbone features from which two images are near-duplicates.
DUPLICATE_THRESHOLD = 0.95
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
_MAD_FLOOR = 0.1  # a cluster's MAD is at least this share of the whole set's


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class OutlierRule:
    """What scoring needs of a fit: the ``K' x d`` unit cluster means (clusters with images),
    and per mean the median and the (floored) MAD of the distances of the images nearest to it.
    Kept with a model, it scores new images as the fit scored its own."""

    means: np.ndarray
    medians: np.ndarray
    mads: np.ndarray

    def scores(self, features: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
        """Modified z-scores (``N``, float64) of ``features`` (``N x d``)."""
        dist, nearest = _nearest(features, self.means, chunk)
        return (dist - self.medians[nearest]) / (_MAD_TO_SIGMA * self.mads[nearest])

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "medians": self.medians, "mads": self.mads}


def _nearest(features: np.ndarray, unit_means: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(features)
    dist = np.empty(n, dtype=np.float64)
    nearest = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):  # N x K similarities a chunk at a time
        sims = _unit(features[s:s + chunk]) @ unit_means.T
        nearest[s:s + chunk] = sims.argmax(axis=1)
        dist[s:s + chunk] = 1.0 - sims.max(axis=1)
    return dist, nearest


def fit_outlier_rule(features: np.ndarray, labels: np.ndarray, *, chunk: int = 8192) -> OutlierRule:
    """The :class:`OutlierRule` of a clustering (see the module docstring). Clusters of
    ``labels`` with no image are left out."""
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    unit_means = _unit(np.stack([_unit(features[labels == c]).sum(axis=0) for c in present]))
    dist, nearest = _nearest(features, unit_means, chunk)
    global_mad = float(np.median(np.abs(dist - np.median(dist))))
    floor = max(_MAD_FLOOR * global_mad, 1e-9)
    medians = np.zeros(len(present), dtype=np.float64)
    mads = np.full(len(present), floor, dtype=np.float64)
    for c in range(len(present)):
        d = dist[nearest == c]
        if len(d):
            medians[c] = np.median(d)
            mads[c] = max(float(np.median(np.abs(d - medians[c]))), floor)
    return OutlierRule(unit_means, medians, mads)


def outlier_scores(features: np.ndarray, labels: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    """Modified z-score (``N``, float64) of each image's cosine distance to the nearest cluster
    mean, among the images nearest to the same mean (see the module docstring): the
    :class:`OutlierRule` of ``labels`` applied to the same images."""
    return fit_outlier_rule(features, labels, chunk=chunk).scores(features, chunk=chunk)


def duplicate_of(graph: sp.csr_matrix, threshold: float = DUPLICATE_THRESHOLD) -> np.ndarray:
    """For each node, the lowest index of its duplicate group if that is another node, else
    ``-1`` (``N``, int64). Groups: connected components of the edges of the cosine kNN
    ``graph`` (either direction) with similarity ``>= threshold``."""
    from scipy.sparse.csgraph import connected_components

    n = graph.shape[0]
    close = graph.tocsr().copy()
    close.data = (close.data >= threshold).astype(np.int8)
    close.eliminate_zeros()
    out = np.full(n, -1, dtype=np.int64)
    if close.nnz == 0:
        return out
    _, group = connected_components(close, directed=True, connection="weak")
    first = np.full(group.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n))
    roots = first[group]
    dup = roots != np.arange(n)
    out[dup] = roots[dup]
    return out
