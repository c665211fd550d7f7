"""SP2OT: the semantic term by majorise-minimise, each step a warm-started P2OT-family solve."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from sp2ot_engine.ot._checks import check_cost, check_params
from sp2ot_engine.ot._newton import newton
from sp2ot_engine.ot._problem import Formulation, SolverInfo, adapt_init, entropic_objective, make_problem


def to_sym_sparse(graph, n: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``S + S^T`` as a torch sparse CSR tensor on ``device``."""
    if isinstance(graph, torch.Tensor):
        if graph.shape != (n, n):
            raise ValueError(f"graph has shape {tuple(graph.shape)}; the cost has N={n} rows, so it must be {n} x {n}")
        g = graph.to_sparse_coo().coalesce().to(torch.float64)
        idx, val = g.indices().cpu().numpy(), g.values().cpu().numpy()
        import scipy.sparse as sp

        graph = sp.coo_matrix((val, (idx[0], idx[1])), shape=(n, n))
    import scipy.sparse as sp

    if not sp.issparse(graph):
        raise ValueError(f"graph must be a scipy.sparse matrix or a torch sparse tensor, got {type(graph).__name__}")
    if graph.shape != (n, n):
        raise ValueError(f"graph has shape {graph.shape}; the cost has N={n} rows, so it must be {n} x {n}")
    sym = (graph + graph.T).tocsr().astype(np.float64)
    if not np.isfinite(sym.data).all():
        raise ValueError("graph contains NaN or infinite weights")
    sym.sum_duplicates()
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(sym.indptr.astype(np.int64)), torch.from_numpy(sym.indices.astype(np.int64)),
            torch.from_numpy(sym.data), size=(n, n), dtype=dtype, device=device)


def solve_sp2ot(cost: torch.Tensor, graph, rho: float, *, lam_s: float, eps: float = 0.1, lam: float = 1.0,
                tol: float = 1e-6, max_iter: int = 1000, mm_tol: float = 1e-8, mm_max_iter: int = 100,
                formulation: Formulation = "p2ot", init: torch.Tensor | None = None, return_info: bool = False):
    r"""Semantic-regularised P2OT (paper Eq. 11) by majorise-minimise.

    ``min_Q <Q,C> + lam KL(...) + eps H(Qh) - lam_s sum_ij S_ij <Q_i, Q_j>`` under the P2OT
    constraints. The concave semantic term is linearised at the current plan,
    ``C_t = C - lam_s (S + S^T) Q_t`` (one sparse-dense product, ``N k K`` multiply-adds),
    and ``Q_{t+1} = P2OT(C_t)``, warm-started from the potentials of step ``t``; from
    ``Q_0 = rho/(N K)``, until a step lowers the objective by less than ``mm_tol`` or after
    ``mm_max_iter`` steps; the plan with the lowest objective is returned. Each exact step
    cannot increase the objective (MM).

    Args:
        cost: ``N x K`` cost.
        graph: ``N x N`` sparse similarity ``S`` (scipy.sparse or torch sparse), e.g. from
            :func:`sp2ot_engine.graph.knn_graph`; never densified.
        rho: total mass in ``(0, 1]``.
        lam_s: strength of the semantic term (see :func:`semantic_strength`).
        formulation: the inner problem (``"p2ot"`` by default; any of :func:`solve_transport`'s).
        mm_tol, mm_max_iter: MM stopping rule (the inner solves use ``min(tol, mm_tol)``).
        Others: as :func:`solve_transport`; ``init`` are column potentials.

    Returns:
        ``Q`` (``N x K``), and a :class:`SolverInfo` if ``return_info`` (``n_iter`` = MM steps).
    """
    check_cost(cost)
    check_params(rho, eps, lam, tol, max_iter)
    if not lam_s >= 0:
        raise ValueError(f"lam_s must be >= 0, got {lam_s!r}")
    n, k = cost.shape
    # The sparse product runs in the cost's precision: float32 costs (as training passes)
    # take torch's much faster float32 sparse kernel; float64 costs get an exact product.
    sdtype = torch.float32 if cost.dtype == torch.float32 else torch.float64
    sym = to_sym_sparse(graph, n, cost.device, sdtype)
    c64 = cost.to(torch.float64)
    rho_eff = 1.0 if formulation in ("uot", "ot") else float(rho)

    def semantic_product(q: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(sym, q.to(sdtype)).to(torch.float64)

    q = c64.new_full((n, k), rho_eff / (n * k))
    sq = semantic_product(q)
    v = init
    f_old = f_new = math.inf
    best: tuple = (math.inf, q, v, math.inf)
    inner = 0
    err = math.inf
    steps = 0
    for steps in range(1, int(mm_max_iter) + 1):
        prob = make_problem(c64 - lam_s * sq, float(rho), formulation, float(eps), float(lam))
        v0 = adapt_init(v, prob.beta.shape[0], k)
        # Inner solves at least as tight as the MM rule, so its decisions are not rounding noise.
        v, qh, it, err, ent = newton(prob, v0.to(prob.beta.device) if v0 is not None else None,
                                     min(tol, mm_tol), int(max_iter))
        inner += it
        q = qh[:, :k]
        sq = semantic_product(q)  # reused by the next step's linearisation
        f_new = entropic_objective(c64, qh, prob, ent) - lam_s * 0.5 * float((q * sq).sum())
        if f_new < best[0]:
            best = (f_new, q, v, err)
        # MM decreases the objective monotonically; once a step gains less than mm_tol (or,
        # with inexact inner solves, nothing at all) further steps only trade rounding noise.
        if f_old - f_new < mm_tol:
            break
        f_old = f_new
    converged = f_old - f_new < mm_tol
    f_best, q, v, err = best
    if not return_info:
        return q.to(cost.dtype)
    return q.to(cost.dtype), SolverInfo(n_iter=steps, n_inner=inner, marginal_error=err, converged=converged,
                                        potentials=v, objective=f_best)


def sp2ot_objective(cost: torch.Tensor, plan: torch.Tensor, graph, rho: float, *, lam_s: float, eps: float = 0.1,
                    lam: float = 1.0, formulation: Formulation = "p2ot") -> float:
    r"""The SP2OT objective of a plan ``Q`` (``N x K``, as returned by the solvers).

    ``<Qh, Ch> + eps sum Qh(log Qh - 1) + lam sum_j KL(col_j || rho/K) - lam_s sum_ij S_ij <Q_i,Q_j>``,
    with the virtual column ``xi = 1/N - Q 1`` when ``rho < 1``. ``lam_s = 0`` gives the P2OT
    objective. Used to compare plans from different solvers on equal terms.
    """
    n, k = cost.shape
    q = plan.to(torch.float64)
    prob = make_problem(cost.detach(), float(rho), formulation, float(eps), float(lam))
    qh = q
    if prob.beta.shape[0] > k:
        qh = torch.cat([q, (1.0 / n - q.sum(dim=1, keepdim=True)).clamp_min(0.0)], dim=1)
    value = entropic_objective(cost.to(torch.float64), qh, prob)
    if lam_s:
        sym = to_sym_sparse(graph, n, cost.device)
        value -= lam_s * 0.5 * float((q * torch.sparse.mm(sym, q)).sum())
    return value
