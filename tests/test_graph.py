"""Tests for sp2ot_engine.graph against a brute-force dense numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sp2ot_engine.graph import all_finite, knn_graph, subgraph, to_torch_sparse


def brute_force(x: np.ndarray, k: int, kernel: str, sigma: float = 2.0) -> np.ndarray:
    """Dense N x N reference: full distance / cosine matrix in float64, self excluded."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    out = np.zeros((n, n))
    if kernel == "gaussian":
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        nbr = np.argsort(d2, axis=1, kind="stable")[:, :k]
        rows = np.arange(n)[:, None]
        out[rows, nbr] = np.exp(-d2[rows, nbr] / (2 * sigma**2 * d))
    else:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        cos = xn @ xn.T
        np.fill_diagonal(cos, -np.inf)
        nbr = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        rows = np.arange(n)[:, None]
        out[rows, nbr] = cos[rows, nbr]
    return out


def pattern(a: np.ndarray) -> np.ndarray:
    return a != 0


@pytest.mark.parametrize("kernel", ["gaussian", "cosine"])
@pytest.mark.parametrize("n,d,k", [(50, 8, 1), (50, 8, 5), (120, 16, 10), (200, 32, 20)])
# batch_size = search tile: one tile, many ragged tiles, tiles wider than a transpose strip
@pytest.mark.parametrize("batch_size", [2048, 13, 90])
def test_matches_brute_force(kernel: str, n: int, d: int, k: int, batch_size: int) -> None:
    rng = np.random.default_rng(n * 1000 + k)
    x = rng.standard_normal((n, d)).astype(np.float32) * 3.0 + 1.0
    g = knn_graph(x, k=k, kernel=kernel, sigma=1.5, batch_size=batch_size)
    ref = brute_force(x, k, kernel, sigma=1.5)
    assert isinstance(g, sp.csr_matrix)
    assert g.shape == (n, n) and g.dtype == np.float32
    assert g.nnz == n * k
    assert np.all(np.diff(g.indptr) == k)  # exactly k per row (directed kNN)
    dense = g.toarray()
    # Gaussian values are > 0 and cosine values are a.s. nonzero, so the support is the kNN set.
    np.testing.assert_array_equal(pattern(dense), pattern(ref))
    np.testing.assert_allclose(dense, ref, atol=1e-5, rtol=0)
    assert np.all(g.diagonal() == 0)
    assert g.has_sorted_indices
    assert np.all(np.diff(g.indices.reshape(n, k), axis=1) > 0)


def test_gaussian_value_formula_uses_sigma_and_dimension() -> None:
    # Two 1-D points at distance 2 plus a far third: with d=1, sigma=2,
    # S_01 = exp(-4 / (2 * 4 * 1)) = exp(-0.5).
    x = np.array([[0.0], [2.0], [100.0]])
    g = knn_graph(x, k=1, sigma=2.0)
    assert g[0, 1] == pytest.approx(np.exp(-0.5), abs=1e-7)
    assert g[1, 0] == pytest.approx(np.exp(-0.5), abs=1e-7)
    # 2's nearest is 1 at distance 98: exp(-98^2 / 8)
    assert g[2, 1] == pytest.approx(np.exp(-98.0**2 / 8.0), abs=1e-12)
    # Same geometry embedded in d=4 (zero padding): the exponent is divided by d=4.
    x4 = np.hstack([x, np.zeros((3, 3))])
    g4 = knn_graph(x4, k=1, sigma=2.0)
    assert g4[0, 1] == pytest.approx(np.exp(-0.5 / 4), abs=1e-7)


def test_directed_not_symmetrised() -> None:
    # 0 -- 1 ------ 2 on a line: 2's nearest is 1, but 1's nearest is 0.
    x = np.array([[0.0], [1.0], [5.0]])
    g = knn_graph(x, k=1).toarray()
    assert g[2, 1] > 0 and g[1, 2] == 0
    assert g[1, 0] > 0 and g[0, 1] > 0


def test_self_never_included_with_duplicates() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((30, 6)).astype(np.float32)
    # Rows 0..4 identical (5 copies) and rows 5,6 identical: self may not come first.
    x = base.copy()
    x[1:5] = x[0]
    x[6] = x[5]
    for kernel in ("gaussian", "cosine"):
        for k in (1, 2, 4, 8):
            g = knn_graph(x, k=k, kernel=kernel, batch_size=7)  # copies split across tiles
            assert g.nnz == 30 * k
            assert np.all(np.diff(g.indptr) == k)
            assert np.all(g.diagonal() == 0), (kernel, k)
            dense = g.toarray()
            # duplicates of 5/6 are each other's nearest neighbour with similarity 1
            assert dense[5, 6] == pytest.approx(1.0, abs=1e-6)
            assert dense[6, 5] == pytest.approx(1.0, abs=1e-6)
            for i in range(5):
                nbrs = set(g.indices[g.indptr[i]:g.indptr[i + 1]].tolist())
                others = {0, 1, 2, 3, 4} - {i}
                if k >= 4:
                    assert others <= nbrs
                else:
                    assert nbrs <= others  # k < 4 copies: all neighbours are copies
                np.testing.assert_allclose(dense[i, sorted(others & nbrs)], 1.0, atol=1e-6)


def test_all_points_identical() -> None:
    x = np.ones((6, 3))
    g = knn_graph(x, k=5)
    np.testing.assert_allclose(g.toarray(), 1.0 - np.eye(6), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.float32])
def test_torch_input_any_float_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 5)).astype(np.float32)
    t = torch.from_numpy(x).to(dtype)
    ref_x = t.to(torch.float32).numpy()  # what the function sees after the cast
    g = knn_graph(t, k=4)
    np.testing.assert_allclose(g.toarray(), brute_force(ref_x, 4, "gaussian"), atol=1e-5)


def test_numpy_noncontiguous_and_float64_input() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 80))  # float64, transposed view -> non-contiguous
    xt = x.T
    assert not xt.flags.c_contiguous
    g = knn_graph(xt, k=3, kernel="cosine")
    np.testing.assert_allclose(g.toarray(), brute_force(xt, 3, "cosine"), atol=1e-5)


def test_batch_size_does_not_change_result() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((101, 7)).astype(np.float32)
    a = knn_graph(x, k=6, batch_size=1)
    b = knn_graph(x, k=6, batch_size=17)
    c = knn_graph(x, k=6, batch_size=10_000)
    assert (a != b).nnz == 0 and (a != c).nnz == 0


def test_device_cpu_accepted() -> None:
    x = np.random.default_rng(1).standard_normal((20, 3))
    a = knn_graph(x, k=3, device="cpu")
    b = knn_graph(x, k=3, device=torch.device("cpu"))
    assert (a != b).nnz == 0


def test_gpu_index_path_used_unless_cpu_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    """With (faked) GPU faiss, device None/'cuda:1' build a GPU flat index; 'cpu' does not."""
    import faiss

    calls: list[tuple[int, str]] = []

    def fake_to_gpu(res, gpu_id, index):  # a CPU index stands in for the GPU one
        calls.append((gpu_id, type(index).__name__))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_to_gpu, raising=False)
    x = np.random.default_rng(5).standard_normal((40, 6)).astype(np.float32)
    ref_l2, ref_cos = brute_force(x, 4, "gaussian"), brute_force(x, 4, "cosine")
    np.testing.assert_allclose(knn_graph(x, k=4).toarray(), ref_l2, atol=1e-5)
    np.testing.assert_allclose(knn_graph(x, k=4, kernel="cosine", device="cuda:1").toarray(),
                               ref_cos, atol=1e-5)
    assert calls == [(0, "IndexFlatL2"), (1, "IndexFlatIP")]
    knn_graph(x, k=4, device="cpu")
    knn_graph(x, k=4, device=torch.device("cpu"))
    assert len(calls) == 2


def test_cuda_request_without_gpu_faiss_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    x = np.random.default_rng(6).standard_normal((30, 4))
    np.testing.assert_allclose(knn_graph(x, k=3, device="cuda").toarray(),
                               brute_force(x, 3, "gaussian"), atol=1e-5)


# ---------------------------------------------------------------------------- validation
GOOD = np.random.default_rng(0).standard_normal((10, 4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"features": np.zeros(10)}, r"2-D.*shape \(10,\)"),
        ({"features": np.zeros((2, 3, 4))}, r"2-D"),
        ({"features": np.zeros((1, 4)), "k": 1}, r"at least 2 rows.*N=1"),
        ({"features": GOOD, "k": 0}, r"k must be >= 1"),
        ({"features": GOOD, "k": -3}, r"k must be >= 1"),
        ({"features": GOOD, "k": 10}, r"k=10.*N=10.*maximum allowed k = 9"),
        ({"features": GOOD, "k": 2.5}, r"k must be an integer"),
        ({"features": GOOD, "kernel": "rbf"}, r"unknown kernel 'rbf'.*'gaussian', 'cosine'"),
        ({"features": GOOD, "sigma": 0.0}, r"sigma must be .*> 0"),
        ({"features": GOOD, "sigma": -1.0}, r"sigma must be .*> 0"),
        ({"features": GOOD, "sigma": float("nan")}, r"sigma must be"),
        ({"features": GOOD, "batch_size": 0}, r"batch_size must be >= 1"),
        ({"features": np.array([["a", "b"], ["c", "d"]])}, r"numeric"),
        ({"features": sp.eye(5, format="csr")}, r"dense.*toarray"),
        ({"features": GOOD, "device": "tpu"}, r"device must be"),
        ({"features": np.full((10, 4), 1e30)}, r"too large.*rescale"),
    ],
)
def test_bad_inputs(kwargs: dict, match: str) -> None:
    kwargs = {"k": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        knn_graph(**kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(bad: float) -> None:
    x = GOOD.copy()
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*row 7"):
        knn_graph(x, k=3)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        knn_graph(torch.from_numpy(x), k=3, kernel="cosine")


def test_cosine_zero_row() -> None:
    x = GOOD.copy()
    x[4] = 0
    with pytest.raises(ValueError, match=r"all-zero.*row 4.*gaussian"):
        knn_graph(x, k=3, kernel="cosine")
    knn_graph(x, k=3, kernel="gaussian")  # fine for the Gaussian kernel


# ---------------------------------------------------------------------------- subgraph
@pytest.fixture(scope="module")
def graph_and_ref() -> tuple[sp.csr_matrix, np.ndarray]:
    x = np.random.default_rng(11).standard_normal((150, 6)).astype(np.float32)
    return knn_graph(x, k=8), brute_force(x, 8, "gaussian")


@pytest.mark.parametrize("as_torch", [False, True])
def test_subgraph_equals_dense_block(graph_and_ref, as_torch: bool) -> None:
    g, ref = graph_and_ref
    rows = np.random.default_rng(2).permutation(150)[:60]  # unsorted order
    r = torch.from_numpy(rows) if as_torch else rows
    sub = subgraph(g, r)
    assert isinstance(sub, sp.csr_matrix) and sub.shape == (60, 60)
    assert sub.dtype == np.float32 and sub.has_sorted_indices
    np.testing.assert_allclose(sub.toarray(), ref[np.ix_(rows, rows)], atol=1e-5)
    np.testing.assert_array_equal(sub.toarray(), g.toarray()[np.ix_(rows, rows)])


def test_subgraph_repeated_and_edge_cases(graph_and_ref) -> None:
    g, _ = graph_and_ref
    dense = g.toarray()
    rows = np.array([3, 7, 3, 149, 0, 7])
    np.testing.assert_array_equal(subgraph(g, rows).toarray(), dense[np.ix_(rows, rows)])
    assert subgraph(g, np.array([], dtype=np.int64)).shape == (0, 0)
    full = subgraph(g, np.arange(150))
    np.testing.assert_array_equal(full.toarray(), dense)
    # other input formats
    np.testing.assert_array_equal(subgraph(g.tocoo(), [1, 2, 5]).toarray(),
                                  dense[np.ix_([1, 2, 5], [1, 2, 5])])


@pytest.mark.parametrize(
    "rows,match",
    [
        (np.array([0, 150]), r"\[0, 149\].*\[0, 150\]"),
        (np.array([-1, 2]), r"\[0, 149\]"),
        (np.array([[0, 1]]), r"1-D"),
        (np.array([0.0, 1.0]), r"integer"),
    ],
)
def test_subgraph_bad_rows(graph_and_ref, rows, match: str) -> None:
    g, _ = graph_and_ref
    with pytest.raises(ValueError, match=match):
        subgraph(g, rows)


def test_subgraph_bad_graph() -> None:
    with pytest.raises(ValueError, match="square"):
        subgraph(sp.csr_matrix((3, 4)), [0])
    with pytest.raises(ValueError, match="scipy sparse"):
        subgraph(np.eye(3), [0])


# ---------------------------------------------------------------------------- torch
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_to_torch_sparse(graph_and_ref, layout: str) -> None:
    g, _ = graph_and_ref
    t = to_torch_sparse(g, layout=layout)
    assert t.dtype == torch.float64 and t.shape == (150, 150)
    assert t.layout == (torch.sparse_csr if layout == "csr" else torch.sparse_coo)
    np.testing.assert_array_equal(t.to_dense().numpy(), g.toarray().astype(np.float64))
    q = torch.rand(150, 4, dtype=torch.float64)
    np.testing.assert_allclose((t @ q).numpy(), g.astype(np.float64) @ q.numpy(), atol=1e-12)
    t32 = to_torch_sparse(g, dtype=torch.float32, layout=layout)
    assert t32.dtype == torch.float32
    if layout == "coo":  # transpose product, as used by the solver for S^T Q
        np.testing.assert_allclose((t.t() @ q).numpy(), g.T.astype(np.float64) @ q.numpy(),
                                   atol=1e-12)


def test_to_torch_sparse_subgraph_and_errors(graph_and_ref) -> None:
    g, _ = graph_and_ref
    sub = subgraph(g, np.arange(0, 150, 3))
    np.testing.assert_array_equal(to_torch_sparse(sub).to_dense().numpy(), sub.toarray())
    with pytest.raises(ValueError, match="scipy sparse"):
        to_torch_sparse(np.eye(3))
    with pytest.raises(ValueError, match="layout"):
        to_torch_sparse(g, layout="bsr")  # type: ignore[arg-type]


def test_subgraph_fast_at_training_scale() -> None:
    """m = 5120 memory-bank rows of an N = 60000, k = 20 graph: ~1 ms here; allow 0.5 s."""
    import time

    n, k, m = 60_000, 20, 5120
    rng = np.random.default_rng(0)
    cols = np.sort(rng.integers(0, n, (n, k)), axis=1)
    g = sp.csr_matrix((rng.random(n * k, dtype=np.float32), cols.ravel(),
                       np.arange(0, n * k + 1, k)), shape=(n, n))
    rows = rng.permutation(n)[:m]
    subgraph(g, rows)  # warm-up
    t0 = time.perf_counter()
    for _ in range(5):
        sub = subgraph(g, rows)
    assert (time.perf_counter() - t0) / 5 < 0.5
    # spot-check against the definition on a few rows
    assert sub.shape == (m, m)
    for p in (0, 17, m - 1):
        ref = g.getrow(rows[p]).toarray().ravel()[rows]  # graph[rows[p], rows[q]] for all q
        np.testing.assert_array_equal(sub.getrow(p).toarray().ravel(), ref)


@pytest.mark.parametrize("where", [None, (0, 0), (1234, 5), (2999, 7)])
def test_all_finite_checks_every_chunk(where) -> None:
    x = np.ones((3000, 8), dtype=np.float32)
    if where is not None:
        x[where] = np.nan
    assert all_finite(x, chunk_bytes=64 * 8 * 4) is (where is None)  # 64-row chunks
    assert all_finite(x) is (where is None)
