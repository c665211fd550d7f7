"""Solver tests: constraints, optimality against independent solutions, MM monotonicity,
special cases, extreme inputs and bad input."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch

from sp2ot_engine.ot import (
    rho_schedule,
    semantic_strength,
    solve_p2ot,
    solve_sp2ot,
    solve_transport,
    sp2ot_objective,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference import reference_p2ot, reference_sp2ot  # noqa: E402


def random_cost(n: int, k: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    return -torch.log_softmax(logits, dim=1)


def log_domain_reference(cost: torch.Tensor, rho: float, eps: float, lam: float, formulation: str = "p2ot",
                         iters: int = 200_000, tol: float = 1e-13) -> torch.Tensor:
    """The log-domain scaling iterations of method.md, run to full convergence."""
    n, k = cost.shape
    c = cost.double()
    if formulation in ("uot", "ot"):
        rho = 1.0
    virtual = rho < 1
    if virtual:
        c = torch.cat([c, torch.zeros(n, 1, dtype=torch.float64)], 1)
    beta = torch.full((c.shape[1],), rho / k, dtype=torch.float64)
    f = torch.full_like(beta, lam / (lam + eps) if formulation in ("p2ot", "uot") else 1.0)
    if virtual:
        beta[-1] = 1 - rho
        f[-1] = 1.0
    u = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros_like(beta)
    for _ in range(iters):
        u = eps * math.log(1 / n) - eps * torch.logsumexp((v[None, :] - c) / eps, dim=1)
        v_new = f * (eps * beta.log() - eps * torch.logsumexp((u[:, None] - c) / eps, dim=0))
        done = float((v_new - v).abs().max()) < tol
        v = v_new
        if done:
            break
    q = torch.exp((u[:, None] + v[None, :] - c) / eps)
    return q[:, :k]


def primal_p2ot_scipy(cost: np.ndarray, rho: float, eps: float, lam: float) -> np.ndarray:
    """P2OT solved on its primal with a generic solver (SLSQP), virtual column explicit."""
    n, k = cost.shape
    ch = np.hstack([cost, np.zeros((n, 1))])
    beta = np.full(k, rho / k)

    def f(x):
        q = x.reshape(n, k + 1)
        col = q[:, :k].sum(0)
        val = (q * ch).sum() + eps * (q * (np.log(q) - 1)).sum()
        val += lam * (col * np.log(col / beta) - col + beta).sum()
        return val

    def grad(x):
        q = x.reshape(n, k + 1)
        col = q[:, :k].sum(0)
        g = ch + eps * np.log(q)
        g[:, :k] += lam * np.log(col / beta)[None, :]
        return g.ravel()

    cons = [{"type": "eq", "fun": lambda x: x.reshape(n, k + 1).sum(1) - 1 / n,
             "jac": lambda x: np.kron(np.eye(n), np.ones(k + 1))},
            {"type": "eq", "fun": lambda x: np.array([x.reshape(n, k + 1)[:, k].sum() - (1 - rho)]),
             "jac": lambda x: np.tile(np.r_[np.zeros(k), 1.0], n)[None, :]}]
    x0 = np.full(n * (k + 1), 1 / (n * (k + 1)))
    res = scipy.optimize.minimize(f, x0, jac=grad, constraints=cons, bounds=[(1e-12, None)] * x0.size,
                                  method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
    assert res.success, res.message
    return res.x.reshape(n, k + 1)[:, :k]


# ---------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n,k", [(200, 10), (1000, 50)])
def test_p2ot_constraints(rho, n, k):
    cost = random_cost(n, k, seed=n + k)
    q, info = solve_p2ot(cost, rho, return_info=True)
    assert info.converged and info.marginal_error < 1e-6
    assert (q >= 0).all()
    assert float(q.sum()) == pytest.approx(rho, abs=1e-6)
    assert float(q.sum(1).max()) <= 1 / n * (1 + 1e-6)
    if rho == 1.0:
        assert torch.allclose(q.sum(1), torch.full((n,), 1 / n, dtype=q.dtype), atol=1e-9)


def test_pot_has_exact_uniform_columns():
    cost = random_cost(300, 6, seed=3)
    q = solve_transport(cost, 0.4, formulation="pot")
    assert torch.allclose(q.sum(0), torch.full((6,), 0.4 / 6, dtype=q.dtype), atol=1e-7)
    assert float(q.sum(1).max()) <= 1 / 300 * (1 + 1e-6)


def test_ot_is_balanced_and_uot_moves_all_mass():
    cost = random_cost(300, 6, seed=4)
    q = solve_transport(cost, formulation="ot")
    assert torch.allclose(q.sum(0), torch.full((6,), 1 / 6, dtype=q.dtype), atol=1e-7)
    assert torch.allclose(q.sum(1), torch.full((300,), 1 / 300, dtype=q.dtype), atol=1e-9)
    q = solve_transport(cost, 0.3, formulation="uot")  # rho is ignored: all mass moves
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("formulation,rho", [("p2ot", 0.2), ("p2ot", 0.7), ("pot", 0.2), ("pot", 0.7),
                                             ("uot", 1.0), ("ot", 1.0)])
@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_matches_log_domain_reference(formulation, rho, eps):
    cost = random_cost(60, 5, seed=7)
    q = solve_transport(cost, rho, formulation=formulation, eps=eps, tol=1e-10)
    ref = log_domain_reference(cost, rho, eps, 1.0, formulation)
    assert float((q - ref).abs().sum()) < 1e-7


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_p2ot_matches_generic_primal_solver(rho):
    cost = random_cost(12, 3, seed=11, scale=1.0)
    q = solve_p2ot(cost, rho, eps=0.5, lam=1.0, tol=1e-10).numpy()
    ref = primal_p2ot_scipy(cost.numpy(), rho, 0.5, 1.0)
    assert np.abs(q - ref).sum() < 1e-4


def test_uot_and_ot_match_pot():
    ot = pytest.importorskip("ot")
    cost = random_cost(30, 4, seed=5)
    a, b = np.full(30, 1 / 30), np.full(4, 1 / 4)
    ref = ot.unbalanced.sinkhorn_unbalanced(a, b, cost.numpy(), 0.1, (float("inf"), 1.0), reg_type="entropy",
                                            numItermax=100_000, stopThr=1e-14)
    q = solve_transport(cost, formulation="uot", tol=1e-11).numpy()
    assert np.abs(q - ref).sum() < 1e-6
    ref = ot.sinkhorn(a, b, cost.numpy(), 0.1, numItermax=100_000, stopThr=1e-14)
    q = solve_transport(cost, formulation="ot", tol=1e-11).numpy()
    assert np.abs(q - ref).sum() < 1e-6


def test_matches_research_scaling_loop():
    cost = random_cost(400, 8, seed=2)
    for rho in (0.3, 0.9):
        ref, iters = reference_p2ot(cost, rho, max_iter=20_000, tol=1e-12)
        assert iters < 20_000
        q = solve_p2ot(cost, rho, tol=1e-10)
        assert float((q - ref).abs().sum()) < 1e-7


def test_rho_one_and_large_lam_give_the_balanced_plan():
    cost = random_cost(200, 5, seed=9)
    balanced = solve_transport(cost, formulation="ot", tol=1e-10)
    q = solve_p2ot(cost, 1.0, lam=1e6, tol=1e-10)
    assert float((q - balanced).abs().sum()) < 1e-4
    q_small_lam = solve_p2ot(cost, 1.0, lam=0.1)
    assert float((q_small_lam - balanced).abs().sum()) > 1e-2  # lam matters


def test_row_shift_invariance_and_warm_start():
    cost = random_cost(300, 7, seed=12)
    # rows are equalities when all mass moves (rho = 1): a per-row constant changes nothing
    shifted = cost + torch.linspace(0, 50, 300, dtype=cost.dtype)[:, None]
    q1 = solve_p2ot(cost, 1.0, tol=1e-10)
    assert float((solve_p2ot(shifted, 1.0, tol=1e-10) - q1).abs().sum()) < 1e-8
    # with rho < 1 the virtual column's cost stays 0, so the shift does change the plan
    q_shift, info_shift = solve_p2ot(shifted, 0.5, tol=1e-10, return_info=True)
    assert info_shift.converged and torch.isfinite(q_shift).all()
    q, info = solve_p2ot(cost, 0.5, return_info=True, tol=1e-10)
    q2, info2 = solve_p2ot(cost, 0.5, init=info.potentials, return_info=True, tol=1e-10)
    assert info2.n_iter <= 1
    assert float((q2 - q).abs().sum()) < 1e-8
    # potentials of a rho<1 solve (K+1 entries) can seed a rho=1 solve (K entries) and back
    solve_p2ot(cost, 1.0, init=info.potentials)
    solve_p2ot(cost, 0.5, init=info.potentials[:7])


def test_dtype_and_device_follow_the_input():
    cost = random_cost(100, 4).float()
    q = solve_p2ot(cost, 0.5)
    assert q.dtype == torch.float32 and q.device == cost.device and q.shape == (100, 4)


# ---------------------------------------------------------------------------- speed shortcuts


@pytest.mark.parametrize("n,k,shortcut", [(3000, 20, "coarse_start"), (1200, 300, "_sparse_gram")])
def test_speed_shortcuts_change_only_the_path_not_the_plan(monkeypatch, n, k, shortcut):
    """The coarse start (many rows per column), the sparse Gram product (many columns) and the
    reuse of the Hessian factor must give the plan the plain damped Newton method gives."""
    from sp2ot_engine.ot import _newton, _semidual

    cost = random_cost(n, k, seed=3, scale=6.0)
    taken = []
    original = getattr(_semidual.SemiDual, shortcut, None) or getattr(_newton, shortcut)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    if hasattr(_semidual.SemiDual, shortcut):
        monkeypatch.setattr(_semidual.SemiDual, shortcut, spy)
    else:
        monkeypatch.setattr(_newton, shortcut, spy)
    fast, info_fast = solve_p2ot(cost, 0.5, return_info=True)
    assert any(taken), f"{shortcut} was not used on this problem"
    monkeypatch.setattr(_newton, "COARSE_MIN_ROWS_PER_COLUMN", 10**9)
    monkeypatch.setattr(_semidual, "SPARSE_GRAM_MIN_COLUMNS", 10**9)
    monkeypatch.setattr(_newton, "REUSE_BELOW", 0.0)
    plain, info_plain = solve_p2ot(cost, 0.5, return_info=True)
    assert info_fast.converged and info_plain.converged
    assert float((fast - plain).abs().sum()) < 1e-5
    reference, _ = reference_p2ot(cost, 0.5, tol=1e-10, max_iter=100000)
    assert float((fast - reference).abs().sum()) < 1e-5


def test_sparse_gram_falls_back_to_dense_when_the_plan_is_spread(monkeypatch):
    """Near-uniform predictions (as at the start of training) give a dense plan: the sparse
    Gram product must hand over to the dense one and the solve still converge."""
    from sp2ot_engine.ot._semidual import SemiDual

    results = []
    original = SemiDual._sparse_gram

    def spy(self, s):
        out = original(self, s)
        results.append(out is not None)
        return out

    monkeypatch.setattr(SemiDual, "_sparse_gram", spy)
    cost = random_cost(1200, 300, seed=4, scale=0.05)
    q, info = solve_p2ot(cost, 0.5, return_info=True)
    assert results and not results[-1], "the sparse Gram product was kept on a dense plan"
    assert info.converged and float(q.sum()) == pytest.approx(0.5, abs=1e-6)
    reference, _ = reference_p2ot(cost, 0.5, tol=1e-10, max_iter=100000)
    assert float((q - reference).abs().sum()) < 1e-5


# ---------------------------------------------------------------------------- stability


@pytest.mark.parametrize("eps", [0.01, 0.05])
@pytest.mark.parametrize("rho", [0.1, 0.9, 1.0])
def test_extreme_costs_stay_finite(eps, rho):
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(500, 20, generator=g, dtype=torch.float64) * 1e3
    cost[:, 3] = 0.0  # one column much cheaper than all others
    cost[::7, 15] = 1e3
    q, info = solve_p2ot(cost, rho, eps=eps, return_info=True)
    assert torch.isfinite(q).all() and torch.isfinite(info.potentials).all()
    assert float(q.sum()) == pytest.approx(rho, abs=1e-6)
    assert float(q.sum(1).max()) <= (1 + 1e-6) / 500
    assert info.marginal_error < 1e-6


def test_negative_costs_from_mm_stay_finite():
    cost = random_cost(300, 10) - 200.0  # the MM cost C - lam_s (S+S^T) Q can be negative
    q = solve_p2ot(cost, 0.4, eps=0.01)
    assert torch.isfinite(q).all() and float(q.sum()) == pytest.approx(0.4, abs=1e-6)


# ---------------------------------------------------------------------------- SP2OT


def knn_similarity(n: int, k: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nbr = np.argsort(d, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    vals = np.exp(-d[rows, nbr.ravel()] / (2 * 4 * 8))
    return sp.csr_matrix((vals, (rows, nbr.ravel())), shape=(n, n))


def test_sp2ot_objective_never_increases_over_mm_steps():
    n, k = 200, 6
    cost = random_cost(n, k, seed=21)
    graph = knn_similarity(n, 10)
    lam_s = semantic_strength(0.3, n=n)
    values = []
    for steps in range(1, 8):
        q = solve_sp2ot(cost, graph, 0.3, lam_s=lam_s, mm_max_iter=steps, tol=1e-11)
        values.append(sp2ot_objective(cost, q, graph, 0.3, lam_s=lam_s))
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0] - 1e-6  # the semantic term actually moves the plan


def test_sp2ot_matches_dense_research_mm_and_zero_strength_is_p2ot():
    n, k = 150, 5
    cost = random_cost(n, k, seed=8)
    graph = knn_similarity(n, 8, seed=3)
    lam_s = 5.0
    q, info = solve_sp2ot(cost, graph, 0.5, lam_s=lam_s, tol=1e-11, mm_tol=1e-13, return_info=True)
    ref, steps, _ = reference_sp2ot(cost, torch.from_numpy(graph.toarray()), 0.5, lam_s, tol=1e-13,
                                    max_iter=50_000, mm_tol=1e-13)
    assert float((q - ref).abs().sum()) < 1e-6
    assert float(q.sum()) == pytest.approx(0.5, abs=1e-6)
    q0 = solve_sp2ot(cost, graph, 0.5, lam_s=0.0, tol=1e-10)
    assert float((q0 - solve_p2ot(cost, 0.5, tol=1e-10)).abs().sum()) < 1e-8
    # torch sparse graphs are accepted too
    tg = torch.sparse_coo_tensor(np.vstack(graph.nonzero()), graph.data, size=(n, n))
    q_t = solve_sp2ot(cost, tg, 0.5, lam_s=lam_s, tol=1e-11, mm_tol=1e-13)
    assert float((q_t - q).abs().sum()) < 1e-9


def test_semantic_term_pulls_neighbours_together():
    # Two tight groups; costs are uninformative noise: the graph alone must align labels.
    n, k = 80, 2
    rows, cols = [], []
    for i in range(n):
        group = range(0, 40) if i < 40 else range(40, 80)
        for j in group:
            if j != i:
                rows.append(i)
                cols.append(j)
    graph = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    cost = random_cost(n, k, seed=1, scale=0.1)
    q = solve_sp2ot(cost, graph, 1.0, lam_s=50.0)
    labels = q.argmax(1).numpy()
    assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1 and labels[0] != labels[-1]


# ---------------------------------------------------------------------------- schedules


def test_rho_schedule():
    assert rho_schedule(0, 100) == pytest.approx(0.1 + 0.9 * math.exp(-5))
    assert rho_schedule(100, 100) == pytest.approx(1.0)
    assert rho_schedule(50, 100) == pytest.approx(0.1 + 0.9 * math.exp(-1.25))
    assert rho_schedule(50, 100, kind="linear") == pytest.approx(0.55)
    assert rho_schedule(70, 100, rho0=0.2, kind="fixed") == 0.2
    assert rho_schedule(500, 100) == pytest.approx(1.0)  # clipped
    values = [rho_schedule(t, 50) for t in range(51)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert semantic_strength(0.1) == pytest.approx(900.0)
    assert semantic_strength(0.1, n=2560) == pytest.approx(450.0)
    assert semantic_strength(1.0) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        rho_schedule(1, 10, kind="cubic")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cost,rho,match",
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 0.5, "NaN or infinite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), 0.5, "NaN or infinite"),
        (torch.zeros(5, 1), 0.5, "at least 2 clusters"),
        (torch.zeros(3, 4), 0.5, "at least as many samples"),
        (torch.zeros(5), 0.5, "2-D"),
        (torch.zeros(5, 3), 0.0, r"rho must be in \(0, 1\]"),
        (torch.zeros(5, 3), 1.5, r"rho must be in \(0, 1\]"),
    ],
)
def test_bad_input(cost, rho, match):
    with pytest.raises(ValueError, match=match):
        solve_p2ot(cost, rho)


def test_bad_graph_and_formulation():
    cost = random_cost(10, 3)
    with pytest.raises(ValueError, match="must be 10 x 10"):
        solve_sp2ot(cost, sp.eye(9, format="csr"), 0.5, lam_s=1.0)
    with pytest.raises(ValueError, match="scipy.sparse"):
        solve_sp2ot(cost, np.eye(10), 0.5, lam_s=1.0)
    with pytest.raises(ValueError, match="unknown formulation"):
        solve_transport(cost, 0.5, formulation="sela")
    with pytest.raises(ValueError, match="init has"):
        solve_p2ot(cost, 0.5, init=torch.zeros(2))


def test_every_public_name_of_the_old_module_is_importable_from_the_package():
    import sp2ot_engine.ot as ot

    old = ["COARSE_MIN_ROWS_PER_COLUMN", "COARSE_STRIDE", "COARSE_TOL", "FORMULATIONS", "Formulation", "REUSE_BELOW",
           "SPARSE_GRAM_BELOW", "SPARSE_GRAM_MAX_DENSITY", "SPARSE_GRAM_MIN_COLUMNS", "SolverInfo", "rho_schedule",
           "semantic_strength", "solve_p2ot", "solve_sp2ot", "solve_transport", "sp2ot_objective"]
    assert [name for name in old if not hasattr(ot, name)] == []
    assert ot.FORMULATIONS == ("p2ot", "pot", "uot", "ot")
