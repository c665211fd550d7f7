"""The research code's solver loops (github.com/rhfeiyang/SPPOT), written out for timing.

Same algorithm as the research code's scaling and MM loops, kept deliberately as they are
there (dense N x N similarity, each MM step's scaling started from scratch, the same
stopping rules) so that `benchmarks/solver.py` can time the project's solvers against them
in one run. Not used by the engine.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def reference_p2ot(cost: torch.Tensor, rho: float, eps: float = 0.1, lam: float = 1.0, tol: float = 1e-6,
                   max_iter: int = 1000) -> tuple[torch.Tensor, int]:
    """Virtual-cluster scaling from b = 1/(K+1); stops when ||b - b_prev||_2 <= tol. Returns (Q, iters)."""
    n, k = cost.shape
    ext = torch.cat([cost.double(), cost.new_zeros(n, 1, dtype=torch.float64)], dim=1)
    kernel = torch.exp(-ext / eps)
    row_marg = torch.full((n, 1), 1.0 / n, dtype=torch.float64)
    col_marg = torch.full((k + 1, 1), rho / k, dtype=torch.float64)
    col_marg[-1] = 1.0 - rho
    b = torch.full((k + 1, 1), 1.0 / (k + 1), dtype=torch.float64)
    power = lam / (lam + eps)
    err, iters = 1.0, 0
    prev = b.clone()
    while err > tol and iters < max_iter:
        a = row_marg / (kernel @ b)
        b = col_marg / (kernel.T @ a)
        b[:-1] = b[:-1].pow(power)
        err = float(torch.linalg.norm(b - prev))
        prev = b.clone()
        iters += 1
    plan = a * kernel * b.T
    return plan[:, :-1], iters


@torch.no_grad()
def reference_sp2ot(cost: torch.Tensor, dense_graph: torch.Tensor, rho: float, lam_s: float, eps: float = 0.1,
                    lam: float = 1.0, tol: float = 1e-6, max_iter: int = 1000, mm_tol: float = 1e-6,
                    mm_max_iter: int = 100) -> tuple[torch.Tensor, int, int]:
    """MM with the dense S + S^T, each inner scaling from scratch. Returns (Q, mm_steps, scaling_iters)."""
    n, k = cost.shape
    cost = cost.double()
    sym = dense_graph.double() + dense_graph.double().T
    q = torch.full_like(cost, rho / (n * k))

    def objective(q: torch.Tensor) -> float:
        semantic = (dense_graph.double() * (q @ q.T)).sum()
        return float((q * cost).sum() - lam_s * semantic + eps * (q * torch.log(q + torch.finfo(torch.float).tiny)).sum())

    f_old = objective(q)
    total = 0
    steps = 0
    for steps in range(1, mm_max_iter + 1):
        q, iters = reference_p2ot(cost - lam_s * (sym @ q), rho, eps, lam, tol, max_iter)
        total += iters
        f_new = objective(q)
        if abs(f_new - f_old) < mm_tol:
            break
        f_old = f_new
    return q, steps, total
