"""Input checks shared by every solver: the cost matrix and the scalar parameters."""
from __future__ import annotations

import torch


def check_cost(cost: torch.Tensor) -> None:
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D (N x K) tensor, got shape {tuple(cost.shape)}")
    n, k = cost.shape
    if k < 2:
        raise ValueError(f"cost has K={k} columns: need at least 2 clusters")
    if n < k:
        raise ValueError(f"cost has N={n} rows for K={k} clusters: need at least as many samples as clusters")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point tensor, got {cost.dtype}")
    # NaN and inf propagate through a sum: one cheap reduction clears the usual case; the
    # elementwise test runs only when the sum is not finite (a bad entry, or overflow).
    if not bool(torch.isfinite(cost.sum())) and not bool(torch.isfinite(cost).all()):
        bad = int((~torch.isfinite(cost)).sum())
        raise ValueError(f"cost contains {bad} NaN or infinite entries: clip or fix the logits first")


def check_params(rho: float, eps: float, lam: float, tol: float, max_iter: int) -> None:
    if not (isinstance(rho, (int, float)) and 0.0 < float(rho) <= 1.0):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
