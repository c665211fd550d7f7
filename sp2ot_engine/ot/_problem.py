"""The transport problem the formulations share: rows fixed to ``1/N``, column targets
``beta`` (exact, or tied by ``lam * KL``), an optional virtual column for the unselected mass;
its primal objective; the solvers' diagnostics (:class:`SolverInfo`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sp2ot_engine.options import TRANSPORT_FORMULATIONS

Formulation = Literal["p2ot", "pot", "uot", "ot"]
FORMULATIONS: tuple[str, ...] = TRANSPORT_FORMULATIONS


@dataclass(frozen=True)
class SolverInfo:
    """Diagnostics of one solve.

    Attributes:
        n_iter: Newton iterations (P2OT family) or MM steps (SP2OT).
        n_inner: total inner Newton iterations across MM steps (equals ``n_iter`` for P2OT).
        marginal_error: L1 violation of the exact column constraints plus the distance of
            the KL-tied columns from their optimality condition, ``||t(v) - Qh^T 1||_1``.
            Row constraints hold exactly by construction.
        converged: whether ``marginal_error < tol`` (P2OT) / the MM objective settled (SP2OT).
        potentials: the column potentials ``v`` (``K+1`` or ``K``, float64): pass them back as
            ``init`` to warm-start the next, similar solve.
        objective: the primal objective of the solved problem (SP2OT: including the
            semantic term), float.
    """

    n_iter: int
    n_inner: int
    marginal_error: float
    converged: bool
    potentials: torch.Tensor
    objective: float


@dataclass
class Problem:
    """An entropic semi-relaxed OT problem with rows fixed to 1/N.

    ``neg_cost_eps = -(Ch - rowmin)/eps`` (N x m, float64), ``beta`` the column targets,
    ``soft`` which columns carry the ``lam * KL`` penalty (the others are exact).
    """

    neg_cost_eps: torch.Tensor
    beta: torch.Tensor
    soft: torch.Tensor
    eps: float
    lam: float
    n_real: int  # K: columns returned to the caller


def make_problem(cost: torch.Tensor, rho: float, formulation: str, eps: float, lam: float) -> Problem:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}: choose one of {', '.join(FORMULATIONS)}")
    n, k = cost.shape
    if formulation in ("uot", "ot"):
        rho = 1.0  # these formulations transport all the mass
    virtual = rho < 1.0
    m = k + 1 if virtual else k
    c = torch.zeros(n, m, dtype=torch.float64, device=cost.device)
    c[:, :k] = cost
    # A constant per row does not change the solution (rows are equalities): shift to min 0,
    # so that -(c - rowmin)/eps, formed in one pass, has row maxima exactly 0.
    rowmin = c.amin(dim=1, keepdim=True)
    neg_cost_eps = torch.add(rowmin.div_(eps), c, alpha=-1.0 / eps, out=c)
    beta = c.new_full((m,), rho / k)
    soft = torch.zeros(m, dtype=torch.bool, device=c.device)
    if formulation in ("p2ot", "uot"):
        soft[:k] = True
    if virtual:
        beta[k] = 1.0 - rho
    return Problem(neg_cost_eps=neg_cost_eps, beta=beta, soft=soft, eps=eps, lam=lam, n_real=k)

def entropic_objective(cost: torch.Tensor, qh: torch.Tensor, prob: Problem, entropy: float | None = None) -> float:
    """<Qh, Ch> + eps sum Qh(log Qh - 1) + lam sum_soft KL(col_j || beta_j), on the unshifted cost."""
    k = prob.n_real
    lin = float((qh[:, :k] * cost).sum())
    if entropy is None:
        entropy = float(torch.special.xlogy(qh, qh).sum() - qh.sum())
    col = qh.sum(dim=0)
    kl = torch.special.xlogy(col, col) - col * torch.log(prob.beta) - col + prob.beta
    return lin + prob.eps * entropy + prob.lam * float(kl[prob.soft].sum())


def adapt_init(init: torch.Tensor | None, m: int, n_real: int) -> torch.Tensor | None:
    """Reuse potentials from a solve with (or without) the virtual column."""
    if init is None:
        return None
    init = torch.as_tensor(init, dtype=torch.float64).flatten()
    if init.numel() == m:
        return init
    if init.numel() in (n_real, n_real + 1) and m in (n_real, n_real + 1):
        return torch.cat([init[:n_real], init.new_zeros(m - n_real)])
    raise ValueError(f"init has {init.numel()} potentials; expected {m} for this problem")
