r"""Per-image flags of a clustering: outliers and (near-)duplicates.

* :func:`outlier_scores` -- how far each image lies from every cluster. ``d_i = 1 - max_c
  cos(f_i, m_c)``, the cosine distance to the nearest cluster mean ``m_c`` (the unit-norm
  mean of the unit-norm features of cluster ``c``), scored as a robust z-score among the
  images whose nearest mean is the same: ``z_i = (d_i - median_c) / (1.4826 MAD_c)``, the
  modified z-score of Iglewicz & Hoaglin (1993). An image is an outlier when
  ``z_i > OUTLIER_THRESHOLD = 3.5`` (their recommended cut; for normal data it flags about
  0.05 %). A cluster's ``MAD`` is floored at a tenth of the whole set's, so a very tight or a
  tiny cluster does not flag its slightly looser members.
* :func:`perceptual_hash` -- the 64-bit DCT perceptual hash (pHash, ``imagehash.phash``) of a
  decoded image: grey, resized to ``32 x 32``, 2-D DCT, the ``8 x 8`` lowest frequencies
  thresholded at their median, packed row-major into a ``uint64`` (first bit most significant).
  Re-encoding and rescaling move few of the 64 bits; a crop of a small image can move many.
* :func:`duplicate_of` -- for each image, the first (lowest-index) image it duplicates, or
  ``-1``: two images are joined by an edge of the cosine kNN graph with ``cos >= threshold``,
  or, given their perceptual hashes, with ``cos >= hash_threshold`` and hashes that differ in
  at most ``max_hamming`` bits (the hash vouches for look-alike pairs the features alone
  cannot tell from distinct look-alike items); joined images form groups (connected
  components) and every member of a group but the first points to the first. Exact copies
  have ``cos = 1`` and Hamming distance 0. The defaults :data:`DUPLICATE_THRESHOLD`,
  :data:`DUPLICATE_HASH_THRESHOLD` and :data:`DUPLICATE_MAX_HAMMING` were chosen with
  ``benchmarks/near_duplicates.py`` (re-encoded, resized and slightly cropped copies of
  Fashion-MNIST images, EfficientNet-Lite0 features).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["DUPLICATE_HASH_THRESHOLD", "DUPLICATE_MAX_HAMMING", "DUPLICATE_THRESHOLD", "OUTLIER_THRESHOLD",
           "OutlierRule", "duplicate_of", "fit_outlier_rule", "hamming", "outlier_scores", "perceptual_hash",
           "perceptual_hash_int64"]

#: Modified z-score above which an image is an outlier.
OUTLIER_THRESHOLD = 3.5
#: Cosine similarity of the backbone features from which two images are near-duplicates.
DUPLICATE_THRESHOLD = 0.96
#: Most bits in which the perceptual hashes of two near-duplicates differ (of 64) ...
DUPLICATE_MAX_HAMMING = 4
#: ... when their cosine similarity is at least this (below :data:`DUPLICATE_THRESHOLD`).
DUPLICATE_HASH_THRESHOLD = 0.90
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


def perceptual_hash(image) -> np.uint64:
    """The 64-bit DCT perceptual hash of a PIL image (see the module docstring)."""
    import imagehash

    bits = np.asarray(imagehash.phash(image).hash, dtype=bool).ravel()  # 8 x 8, row-major
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.uint64)


def perceptual_hash_int64(image) -> int:
    """:func:`perceptual_hash` as a signed 64-bit int (the same bits), as torch batches carry it."""
    return int(perceptual_hash(image).view(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits in which the ``uint64`` hashes ``a`` and ``b`` differ (elementwise, int64)."""
    diff = np.ascontiguousarray(np.asarray(a, dtype=np.uint64) ^ np.asarray(b, dtype=np.uint64))
    return np.unpackbits(diff.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1, dtype=np.int64)


def duplicate_of(graph: sp.csr_matrix, threshold: float = DUPLICATE_THRESHOLD, *,
                 hashes: np.ndarray | None = None, max_hamming: int = DUPLICATE_MAX_HAMMING,
                 hash_threshold: float = DUPLICATE_HASH_THRESHOLD) -> np.ndarray:
    """For each node, the lowest index of its duplicate group if that is another node, else
    ``-1`` (``N``, int64). Groups: connected components of the edges ``(i, j)`` of the cosine
    kNN ``graph`` (either direction) with similarity ``>= threshold``, or, given ``hashes``
    (``N`` uint64 perceptual hashes), with similarity ``>= hash_threshold`` and hashes that
    differ in at most ``max_hamming`` bits."""
    from scipy.sparse.csgraph import connected_components

    n = graph.shape[0]
    close = graph.tocsr().copy()
    keep = close.data >= threshold
    if hashes is not None:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(hashes) != n:
            raise ValueError(f"{len(hashes)} hashes for a graph of {n} nodes")
        rows = np.repeat(np.arange(n), np.diff(close.indptr))
        keep |= (close.data >= hash_threshold) & (hamming(hashes[rows], hashes[close.indices]) <= max_hamming)
    close.data = keep.astype(np.int8)
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
