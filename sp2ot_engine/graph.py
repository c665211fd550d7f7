"""Sparse kNN similarity graph for the SP2OT semantic regulariser.

SP2OT (method.md, "SP2OT — semantic regularisation") adds ``-lam_s * sum_ij S_ij <Q_i, Q_j>``
to the pseudo-label problem, where ``S`` (``N x N``) is a sparse kNN graph on the features
``F`` (``N x d``) of the frozen initial backbone:

* Gaussian kernel (paper default, ``sigma = 2``, ``k = 20``)::

      S_ij = exp( -||f_i - f_j||^2 / (2 sigma^2 d) )   if j in kNN_k(i), j != i;  else 0

* Cosine kernel (the paper's alternative)::

      S_ij = cos(f_i, f_j) = <f_i, f_j> / (||f_i|| ||f_j||)   on the kNN by cosine similarity

  (may be negative when fewer than ``k`` neighbours point the same way).

``S`` is the DIRECTED kNN graph: row ``i`` holds exactly the ``k`` nearest neighbours of
``i`` (``N * k`` stored entries), and ``S`` is generally NOT symmetric (``j`` in ``kNN(i)``
does not imply ``i`` in ``kNN(j)``). It is deliberately not symmetrised: the MM step of the
solver uses the gradient ``(S + S^T) Q_t`` itself, so symmetrising here would double-count.

The dense ``N x N`` matrix is never built. Neighbours come from an exact (brute-force)
search -- squared L2 for the Gaussian kernel, inner product on L2-normalised features for
the cosine kernel:

* GPU (faiss has GPU support and ``device`` is not the CPU): ``faiss.IndexFlatL2`` /
  ``IndexFlatIP`` moved to the GPU, queried ``batch_size`` rows at a time;
* CPU: the algorithm of faiss' flat-index search (BLAS score tiles + faiss heap selection),
  but since the queries are the database each ``batch_size x batch_size`` tile is computed
  once and used for both its row block and (transposed) its column block: half the GEMM
  work of ``IndexFlatL2.search(F)``, and no index copy of ``F``.

Memory stays ``O(N * k + N * d)``: the features, the ``N x (k + 1)`` candidate lists and two
``batch_size^2`` float32 tiles. Kept similarities are then recomputed exactly from the
features (direct differences), so values carry no ``|a|^2 + |b|^2 - 2<a,b>`` rounding.

Also provided: :func:`subgraph` (the graph restricted to a memory bank's rows, called every
training step) and :func:`to_torch_sparse` (hand-off to the torch solver).
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from sp2ot_engine.options import KERNELS

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["all_finite", "knn_graph", "subgraph", "to_torch_sparse"]

Kernel = Literal["gaussian", "cosine"]

#: Rows per search tile: on the CPU the search works on ``batch_size x batch_size`` float32
#: score tiles (two of them: 32 MB at 2048), on a GPU index it is the query batch size.
DEFAULT_BATCH_SIZE = 2048
_TRANSPOSE_STRIP = 64
# Rows per chunk when recomputing the kept neighbours' similarities exactly: the gathered
# neighbour block is ``chunk * (k + 1) * d`` float32 (~27 MB for 256 x 21 x 1280).
_REFINE_CHUNK = 256


# --------------------------------------------------------------------------------------
# input conversion / validation
# --------------------------------------------------------------------------------------
def _is_torch_tensor(x: Any) -> bool:
    torch_mod = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    return torch_mod is not None and isinstance(x, torch_mod.Tensor)


def _features_to_numpy(features: Any) -> np.ndarray:
    """Return ``features`` as a C-contiguous float32 numpy array (no copy when possible)."""
    if _is_torch_tensor(features):
        import torch

        t = features.detach()
        if t.is_complex():
            raise ValueError(f"features must be real-valued, got a torch tensor of dtype {t.dtype}")
        if t.is_sparse or t.layout != torch.strided:
            t = t.to_dense()
        return np.ascontiguousarray(t.to(device="cpu", dtype=torch.float32).numpy())
    if sp.issparse(features):
        raise ValueError("features must be a dense array (numpy array or torch tensor), "
                         "got a scipy sparse matrix; call .toarray() first")
    arr = np.asarray(features)
    if arr.dtype.kind == "c":
        raise ValueError(f"features must be real-valued, got dtype {arr.dtype}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"features must be a numeric array (numpy array or torch tensor), "
                         f"got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def all_finite(x: np.ndarray, chunk_bytes: int = 1 << 22) -> bool:
    """``np.isfinite(x).all()`` of an ``N x d`` array, a few MB of rows at a time.

    ``np.isfinite(x)`` on the whole array is an ``N x d`` boolean temporary (a quarter of float32
    features; ``torch.isfinite`` also makes an ``abs`` copy): memory that grows with ``N``.
    """
    rows = max(1, chunk_bytes // max(1, x.itemsize * x.shape[1]))
    return all(bool(np.isfinite(x[s:s + rows]).all()) for s in range(0, x.shape[0], rows))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _wants_gpu(device: Any) -> tuple[bool, int]:
    """``(use_gpu, gpu_id)`` for the requested device given what faiss supports.

    ``device=None`` means "GPU if faiss has one"; ``"cpu"`` (or a CPU ``torch.device``)
    forces the CPU index; ``"cuda"``/``"cuda:i"``/``i`` ask for GPU ``i`` (silently
    falling back to the CPU when faiss was built without GPU support).
    """
    import faiss

    gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device is None:
        return gpu_ok, 0
    if isinstance(device, numbers.Integral) and not isinstance(device, bool):
        return gpu_ok, int(device)
    dev = str(device).strip().lower()
    if dev == "cpu" or dev.startswith("cpu:"):
        return False, 0
    if dev.startswith("cuda") or dev.startswith("gpu"):
        _, _, idx = dev.partition(":")
        return gpu_ok, int(idx) if idx.isdigit() else 0
    raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:<i>' or a torch.device, "
                     f"got {device!r}")


def _gpu_knn_ids(
    x: np.ndarray, kk: int, metric: int, gpu_id: int, batch_size: int
) -> np.ndarray:
    """Best-first ``kk`` neighbour ids of every row of ``x`` with a faiss GPU flat index."""
    import faiss

    res = faiss.StandardGpuResources()
    flat = faiss.IndexFlatL2(x.shape[1]) if metric == faiss.METRIC_L2 \
        else faiss.IndexFlatIP(x.shape[1])
    index = faiss.index_cpu_to_gpu(res, gpu_id, flat)
    index.add(x)
    ids = np.empty((x.shape[0], kk), dtype=np.int64)
    for start in range(0, x.shape[0], batch_size):
        stop = min(start + batch_size, x.shape[0])
        ids[start:stop] = index.search(x[start:stop], kk)[1]
    del index, res
    return ids


def _transpose_into(src: np.ndarray, dst: np.ndarray, strip: int = _TRANSPOSE_STRIP) -> None:
    """``dst[...] = src.T`` in column strips (~4x faster than numpy's strided copy)."""
    for r0 in range(0, src.shape[0], strip):
        dst[:, r0:r0 + strip] = src[r0:r0 + strip].T


def _cpu_knn_ids(x: np.ndarray, kk: int, metric: int, block: int) -> np.ndarray:
    """Best-first ``kk`` neighbour ids of every row of ``x`` among all rows (self included).

    Exact brute force with the algorithm of faiss' ``knn_L2sqr`` / ``knn_inner_product``
    (what ``IndexFlatL2.search`` / ``IndexFlatIP.search`` run: BLAS tiles of scores, then
    faiss heap selection), exploiting that the queries ARE the database: each
    ``block x block`` tile ``(I, J)`` with ``J >= I`` is computed once and fed to the heaps
    of the rows ``I`` and, transposed, of the rows ``J``. This halves the GEMM work
    (``N^2 d`` instead of ``2 N^2 d`` flops), the dominant cost. Scores: squared L2
    ``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>`` (kept smallest) or inner product (kept largest).
    Memory: two ``block x block`` float32 tiles plus the ``N x kk`` heaps (no copy of ``x``).
    """
    import faiss

    n = x.shape[0]
    l2 = metric == faiss.METRIC_L2
    heap_vals = np.empty((n, kk), dtype=np.float32)
    heap_ids = np.empty((n, kk), dtype=np.int64)
    heaps = faiss.float_maxheap_array_t() if l2 else faiss.float_minheap_array_t()
    heaps.k, heaps.nh = kk, n
    heaps.val, heaps.ids = faiss.swig_ptr(heap_vals), faiss.swig_ptr(heap_ids)
    heaps.heapify()
    sq = np.einsum("nd,nd->n", x, x, dtype=np.float64).astype(np.float32) if l2 else None
    tile = np.empty(block * block, dtype=np.float32)
    tile_t = np.empty(block * block, dtype=np.float32)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            g = tile[:(i1 - i0) * (j1 - j0)].reshape(i1 - i0, j1 - j0)
            np.matmul(x[i0:i1], x[j0:j1].T, out=g)  # BLAS, multi-threaded
            if sq is not None:
                g *= -2.0
                g += sq[j0:j1]
                g += sq[i0:i1, None]
            heaps.addn(j1 - j0, faiss.swig_ptr(g), j0, i0, i1 - i0)  # rows I, ids from J
            if j0 != i0:
                gt = tile_t[:(i1 - i0) * (j1 - j0)].reshape(j1 - j0, i1 - i0)
                _transpose_into(g, gt)
                heaps.addn(i1 - i0, faiss.swig_ptr(gt), i0, j0, j1 - j0)  # rows J, ids from I
    heaps.reorder()  # sort each row best first
    del heaps
    return heap_ids


# --------------------------------------------------------------------------------------
# kNN graph
# --------------------------------------------------------------------------------------
def knn_graph(
    features: Any,
    k: int = 20,
    kernel: Kernel = "gaussian",
    sigma: float = 2.0,
    *,
    device: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> sp.csr_matrix:
    """Directed, sparse kNN similarity graph ``S`` (``N x N``, float32 CSR, ``N * k`` entries).

    Row ``i`` holds the ``k`` nearest neighbours ``j != i`` of ``f_i`` (exact search):

    * ``kernel="gaussian"``: neighbours by Euclidean distance,
      ``S_ij = exp(-||f_i - f_j||^2 / (2 * sigma**2 * d))`` with ``d`` the feature dimension;
    * ``kernel="cosine"``: neighbours by cosine similarity, ``S_ij = cos(f_i, f_j)``
      (``sigma`` is ignored).

    The point itself is never its own neighbour: ``k + 1`` neighbours are searched and ``i``
    is dropped; when exact duplicates of ``f_i`` push ``i`` out of its own ``k + 1`` list,
    the farthest (last) candidate is dropped instead, so every row has exactly ``k``
    entries and duplicates of ``f_i`` appear as neighbours with similarity 1.

    The graph is NOT symmetrised (see the module docstring): the SP2OT solver uses
    ``(S + S^T) Q`` itself. Column indices are sorted within each row.

    Similarities of the kept pairs are recomputed exactly from the features (direct
    differences, no ``||a||^2 + ||b||^2 - 2<a,b>`` cancellation), so the values do not
    inherit the search's float32 BLAS rounding. The neighbour SET is exact up to that
    rounding: candidates whose distances tie (or differ by less than float32 resolution of
    the scores) may be chosen either way, like with faiss' flat indexes.

    Cost on the CPU: ``N^2 d / 2`` multiply-adds in BLAS (threads as configured for
    OpenBLAS/faiss) plus ``O(N^2)`` single-threaded tile work; for ``N = 60000``,
    ``d = 1280``, ``k = 20`` that measured ~54 CPU-seconds with 1 thread and ~79 with 2
    (BLAS threads spin while the tile work runs): an estimated ~40 s wall on 2 idle cores; peak
    memory ~100 MB above the features (see ``benchmarks/knn_graph.py``).

    Args:
        features: ``N x d`` numpy array or torch tensor (any real dtype, any device);
            converted to contiguous float32 numpy.
        k: neighbours per row, ``1 <= k <= N - 1``.
        kernel: ``"gaussian"`` or ``"cosine"``.
        sigma: Gaussian bandwidth, ``> 0`` (paper: 2).
        device: ``None`` (GPU index if faiss has GPU support, else CPU), ``"cpu"``,
            ``"cuda"``/``"cuda:i"``/``i``/``torch.device``.
        batch_size: search tile size: CPU score tiles are ``batch_size x batch_size``
            float32 (two of them; 16 MB each at the default 2048); GPU query batch size.

    Returns:
        ``scipy.sparse.csr_matrix`` of shape ``(N, N)``, dtype float32, ``N * k`` stored
        entries, zero diagonal.

    Raises:
        ValueError: features not 2-D or not numeric, ``N < 2``, NaN/inf values (or norms
            overflowing float32), all-zero rows with the cosine kernel, ``k`` out of
            ``[1, N - 1]``, unknown kernel, ``sigma <= 0``, ``batch_size < 1``, bad device.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(map(repr, KERNELS))}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) \
            or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    batch_size = _check_int("batch_size", batch_size, 1)

    x = _features_to_numpy(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array of shape (N, d), got shape {x.shape}; "
                         "reshape to (n_samples, n_features)")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"features must have at least 2 rows (samples) to build a kNN graph, "
                         f"got N={n}")
    if d < 1:
        raise ValueError(f"features must have at least 1 column, got shape {x.shape}")
    k = _check_int("k", k, 1)
    if k >= n:
        raise ValueError(f"k={k} is too large for N={n} samples: k must be < N "
                         f"(maximum allowed k = {n - 1})")
    if not all_finite(x):
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"features contain NaN or inf in {bad.size} row(s) (first: row "
                         f"{int(bad[0])}); remove or impute them before building the graph")

    if kernel == "cosine":
        norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
        zero = np.flatnonzero(norms == 0)
        if zero.size:
            raise ValueError(f"cosine kernel is undefined for all-zero feature rows "
                             f"({zero.size} row(s), first: row {int(zero[0])}); remove them or "
                             "use kernel='gaussian'")
        x = x * (1.0 / norms).astype(np.float32)[:, None]  # new float32 array, N x d
    elif not np.isfinite(np.einsum("nd,nd->n", x, x)).all():
        raise ValueError("features are too large: squared norms overflow float32; rescale "
                         "them (e.g. divide by their maximum absolute value)")

    import faiss

    metric = faiss.METRIC_L2 if kernel == "gaussian" else faiss.METRIC_INNER_PRODUCT
    use_gpu, gpu_id = _wants_gpu(device)
    if use_gpu:  # tested with a stand-in (no GPU faiss in CI)
        ids = _gpu_knn_ids(x, k + 1, metric, gpu_id, batch_size)
    else:
        ids = _cpu_knn_ids(x, k + 1, metric, min(batch_size, n))
    if (ids < 0).any():  # cannot happen for k + 1 <= N and finite features
        raise RuntimeError("kNN search returned fewer neighbours than requested")

    drop = ids == np.arange(n, dtype=np.int64)[:, None]
    drop[~drop.any(axis=1), -1] = True  # i pushed out by duplicates: drop the farthest
    neighbours = ids[~drop].reshape(n, k)
    del ids, drop

    values = np.empty((n, k), dtype=np.float32)
    scale = 1.0 / (2.0 * float(sigma) ** 2 * d)
    for c0 in range(0, n, _REFINE_CHUNK):  # exact similarities of the kept pairs
        c1 = min(c0 + _REFINE_CHUNK, n)
        nb = x[neighbours[c0:c1]]  # (c, k, d)
        if kernel == "gaussian":
            diff = nb - x[c0:c1, None, :]
            values[c0:c1] = np.exp(-np.einsum("ckd,ckd->ck", diff, diff) * scale)
        else:
            values[c0:c1] = np.clip(np.einsum("ckd,cd->ck", nb, x[c0:c1]), -1.0, 1.0)

    order = np.argsort(neighbours, axis=1, kind="stable")  # canonical: sorted column ids
    neighbours = np.take_along_axis(neighbours, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    index_dtype = np.int32 if n <= np.iinfo(np.int32).max // max(k, 1) else np.int64
    indptr = np.arange(0, n * k + 1, k, dtype=index_dtype)
    graph = sp.csr_matrix(
        (values.ravel(), neighbours.ravel().astype(index_dtype), indptr), shape=(n, n)
    )
    graph.has_sorted_indices = True
    return graph


# --------------------------------------------------------------------------------------
# sub-graph on an index set (memory bank)
# --------------------------------------------------------------------------------------
def _rows_to_numpy(rows: Any, n: int) -> np.ndarray:
    if _is_torch_tensor(rows):
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"rows must be a 1-D array of node indices, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"rows must be integer node indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"rows must be in [0, {n - 1}] for a graph with {n} nodes, "
                         f"got values in [{lo}, {hi}]")
    return arr


def subgraph(graph: sp.spmatrix | sp.sparray, rows: Any) -> sp.csr_matrix:
    """The graph restricted to the index set ``rows``, in the given order.

    ``out[p, q] = graph[rows[p], rows[q]]`` for ``p, q < m = len(rows)``; the result is
    ``m x m`` CSR with the graph's dtype and sorted column indices. Repeated indices are
    allowed (the row/column is repeated). Cost ``O(N + m * k)`` with ``k`` the mean number of
    entries per row: ~1 ms for ``m = 5120``, ``N = 60000``, ``k = 20`` (called every
    training step). Duplicate entries of a non-canonical input are kept as they are.

    Args:
        graph: square scipy sparse matrix (any format; CSR avoids a conversion).
        rows: 1-D integer numpy array, sequence or torch LongTensor of node indices in
            ``[0, N)``.

    Raises:
        ValueError: graph not square / not sparse, rows not 1-D integers or out of range.
    """
    if not sp.issparse(graph):
        raise ValueError(f"graph must be a scipy sparse matrix, got {type(graph).__name__}")
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise ValueError(f"graph must be square (N x N), got shape {graph.shape}")
    n = graph.shape[0]
    idx = _rows_to_numpy(rows, n)
    m = idx.size
    g = graph if graph.format == "csr" else graph.tocsr()

    # scipy's compiled row gather (csr_row_index) then column gather (csr_column_index1/2)
    # is O(N + m * k) and handles repeated indices; ~1 ms for m = 5120, N = 60000, k = 20.
    out = sp.csr_matrix(g[idx][:, idx])
    out.has_sorted_indices = False  # scipy may leave the flag stale after column gather
    out.sort_indices()
    return out


# --------------------------------------------------------------------------------------
# torch hand-off
# --------------------------------------------------------------------------------------
def to_torch_sparse(
    graph: sp.spmatrix | sp.sparray,
    device: Any = None,
    dtype: "torch.dtype | None" = None,
    layout: Literal["csr", "coo"] = "csr",
) -> "torch.Tensor":
    """Convert a scipy sparse graph to a torch sparse tensor for the solver.

    Args:
        graph: ``N x M`` scipy sparse matrix (any format).
        device: torch device (``None`` = CPU).
        dtype: value dtype, default ``torch.float64``.
        layout: ``"csr"`` (``torch.sparse_csr``, fastest ``S @ Q`` on CPU) or ``"coo"``
            (``torch.sparse_coo``, coalesced; convenient for ``S.t() @ Q``).

    Returns:
        Sparse tensor of shape ``graph.shape`` with the same entries (int64 indices), so
        ``to_torch_sparse(S) @ Q == S @ Q``.
    """
    import torch

    if not sp.issparse(graph):
        raise ValueError(f"graph must be a scipy sparse matrix, got {type(graph).__name__}")
    if layout not in ("csr", "coo"):
        raise ValueError(f"layout must be 'csr' or 'coo', got {layout!r}")
    dtype = torch.float64 if dtype is None else dtype
    shape = tuple(int(s) for s in graph.shape)
    if layout == "csr":
        g = sp.csr_matrix(graph)
        g.sum_duplicates()  # canonical: sorted, unique column indices per row
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.from_numpy(g.indptr.astype(np.int64)),
                torch.from_numpy(g.indices.astype(np.int64)),
                torch.from_numpy(np.asarray(g.data)).to(dtype),
                size=shape,
                device=device,
                check_invariants=False,  # built from a canonical scipy CSR
            )
    c = sp.coo_matrix(graph)
    c.sum_duplicates()
    ind = torch.from_numpy(np.vstack([c.row, c.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        ind, torch.from_numpy(np.asarray(c.data)).to(dtype), size=shape, device=device,
        is_coalesced=True, check_invariants=False,
    )
