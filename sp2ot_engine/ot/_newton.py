"""The solver core: damped Newton on the semi-dual, and the public solvers of the P2OT family
(``p2ot``, ``pot``, ``uot``, ``ot``)."""
from __future__ import annotations

from typing import Literal, overload

import torch

from sp2ot_engine.ot._checks import check_cost, check_params
from sp2ot_engine.ot._problem import Formulation, Problem, SolverInfo, adapt_init, entropic_objective, make_problem
from sp2ot_engine.ot._semidual import SemiDual

# Coarse start: with many rows per column, the potentials solved on every COARSE_STRIDE-th row
# (to COARSE_TOL) are within sampling error of the full solution, which skips most of the
# damped global phase of Newton on the full problem for an eighth of its cost.
COARSE_STRIDE = 8
COARSE_MIN_ROWS_PER_COLUMN = 4
COARSE_TOL = 1e-2
# Once full Newton steps have brought the marginal error below this, the last Cholesky factor
# is reused while it keeps cutting the error tenfold per step.
REUSE_BELOW = 1e-2


def coarse_start(prob: Problem) -> torch.Tensor | None:
    """Potentials of the problem restricted to every ``COARSE_STRIDE``-th row, or ``None`` when
    too few rows per column would remain for them to be close to the full problem's."""
    n, m = prob.neg_cost_eps.shape
    if n < COARSE_STRIDE * COARSE_MIN_ROWS_PER_COLUMN * m:
        return None
    sub = Problem(neg_cost_eps=prob.neg_cost_eps[::COARSE_STRIDE].contiguous(), beta=prob.beta,
                  soft=prob.soft, eps=prob.eps, lam=prob.lam, n_real=prob.n_real)
    return newton(sub, None, COARSE_TOL, 100, entropy=False)[0]


def newton(prob: Problem, v0: torch.Tensor | None, tol: float, max_iter: int, entropy: bool = True):
    """Maximise the semi-dual by damped Newton.

    Returns ``(v, Qh, n_iter, err, entropy)``: the plan ``Qh`` at the final potentials ``v``,
    its marginal error and ``sum Qh (log Qh - 1)`` (``None`` unless ``entropy``).
    """
    m = prob.beta.shape[0]
    if v0 is None:
        v0 = coarse_start(prob)
    v = prob.beta.new_zeros(m) if v0 is None else v0.to(prob.beta).clone()
    sd = SemiDual(prob, v)
    g_val, grad, col, s = sd.evaluate(v)
    err = float(grad.abs().sum())
    it = 0
    damping = 1.0 if v0 is None else 0.01  # a warm or coarse start is close: little damping needed
    chol = None
    reuse = False
    while err >= tol and it < max_iter:
        it += 1
        if reuse:
            # Near the optimum the Hessian hardly moves: the last factor still gives a fast
            # (linearly convergent) step for the price of one evaluation instead of a Gram.
            step = torch.cholesky_solve(grad.unsqueeze(1), chol).squeeze(1)
            v_new = v + step
            g_new, grad_new, col_new, s_new = sd.evaluate(v_new)
            err_new = float(grad_new.abs().sum())
            # Keep reusing while the error falls tenfold a step; otherwise refactor (at the new
            # point if it is better, else back at the old one: the Hessian needs ``sd``'s state).
            reuse = err_new < 0.1 * err
            if err_new < err:
                v, g_val, grad, col, s, err = v_new, g_new, grad_new, col_new, s_new, err_new
                continue
            g_val, grad, col, s = sd.evaluate(v)
        h = sd.neg_hessian(v, col, s)
        # Per-column damping (Levenberg-Marquardt): a nearly empty column has a near-zero
        # curvature and would take an unbounded Newton step; cap it near the scaling step
        # eps*|log(t_j/col_j)|. The damping vanishes with the gradient, so convergence stays
        # quadratic; the small ridge covers float32 Gram error and the all-exact case. The
        # damping factor adapts: it shrinks while full steps succeed and grows on backtracking.
        target = grad + col
        radius = prob.eps * (1.0 + (target.clamp_min(1e-300).log() - col.clamp_min(1e-300).log()).abs())
        ridge = (1e-13 if sd.precise else 1e-7) * float(h.diagonal().abs().max())
        h.diagonal().add_(damping * grad.abs() / radius + ridge + 1e-300)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            step = torch.cholesky_solve(grad.unsqueeze(1), chol).squeeze(1)
        else:  # numerically indefinite: fall back to a diagonally scaled gradient step
            step = grad / h.diagonal().clamp_min(1e-12)
            chol = None
        slope = float(grad @ step)
        t = 1.0
        while True:
            v_new = v + t * step
            g_new, grad_new, col_new, s_new = sd.evaluate(v_new)
            # Armijo on G; near the optimum G's changes fall below float64 resolution, and a
            # smaller marginal error is then the only meaningful test.
            if g_new >= g_val + 1e-4 * t * slope or float(grad_new.abs().sum()) < err:
                break
            t *= 0.5
            if t < 1e-12:
                break
        damping = damping * 0.1 if t == 1.0 else min(damping * 10.0, 1e6)
        if t < 1e-12:  # no progress left at float64 precision: stop at the best point
            g_val, grad, col, s = sd.evaluate(v)
            break
        v, g_val, grad, col, s = v_new, g_new, grad_new, col_new, s_new
        err, err_prev = float(grad.abs().sum()), err
        if t == 1.0 and err < 1e-4 and err > 0.25 * err_prev:
            sd.precise = True  # a full step that barely helps: the float32 direction is the limit
        # Once full Newton steps converge quadratically, try reusing the factor.
        reuse = chol is not None and t == 1.0 and err < REUSE_BELOW and err < 0.1 * err_prev
    qh, ent = sd.plan(s, col, entropy)
    return v, qh, it, err, ent


@overload
def solve_transport(cost: torch.Tensor, rho: float = ..., *, formulation: Formulation = ..., eps: float = ...,
                    lam: float = ..., tol: float = ..., max_iter: int = ..., init: torch.Tensor | None = ...,
                    return_info: Literal[False] = ...) -> torch.Tensor: ...
@overload
def solve_transport(cost: torch.Tensor, rho: float = ..., *, formulation: Formulation = ..., eps: float = ...,
                    lam: float = ..., tol: float = ..., max_iter: int = ..., init: torch.Tensor | None = ...,
                    return_info: Literal[True]) -> tuple[torch.Tensor, SolverInfo]: ...


def solve_transport(cost, rho=1.0, *, formulation="p2ot", eps=0.1, lam=1.0, tol=1e-6, max_iter=1000,
                    init=None, return_info=False):
    r"""Solve one pseudo-label transport problem of the P2OT family.

    Formulations (paper Table IV), all with rows ``Q 1 <= 1/N`` (equality when all mass moves):

    - ``"p2ot"``: total mass ``rho``, columns tied to ``rho/K`` by ``lam * KL`` (virtual
      cluster for the unselected mass ``1 - rho``); with ``rho = 1`` it is ``"uot"``.
    - ``"pot"``: total mass ``rho``, columns exactly ``rho/K``.
    - ``"uot"``: ``rho = 1`` (``rho`` ignored), columns tied to ``1/K`` by ``lam * KL``.
    - ``"ot"``: balanced (SeLa): ``rho = 1``, columns exactly ``1/K``.

    Args:
        cost: ``N x K`` cost, e.g. ``-log softmax(logits)``; finite, ``N >= K >= 2``.
        rho: total mass in ``(0, 1]``.
        eps: entropic regularisation (``>= 0.01`` is stable for costs up to ``1e3``).
        lam: weight of the column KL.
        tol: stop when the column marginal error ``||t(v) - Qh^T 1||_1 < tol``.
        max_iter: Newton iteration cap.
        init: column potentials from a previous, similar solve (``SolverInfo.potentials``).
        return_info: also return a :class:`SolverInfo`.

    Returns:
        ``Q`` (``N x K``, same device/dtype as ``cost``, total mass ``rho``, rows ``<= 1/N``),
        and the :class:`SolverInfo` if ``return_info``.
    """
    check_cost(cost)
    check_params(rho, eps, lam, tol, max_iter)
    prob = make_problem(cost, float(rho), formulation, float(eps), float(lam))
    v0 = adapt_init(init, prob.beta.shape[0], prob.n_real)
    v, qh, it, err, ent = newton(prob, v0.to(prob.beta.device) if v0 is not None else None, tol, int(max_iter),
                                 entropy=return_info)
    q = qh[:, : prob.n_real]
    if not return_info:
        return q.to(cost.dtype)
    info = SolverInfo(n_iter=it, n_inner=it, marginal_error=err, converged=err < tol, potentials=v,
                      objective=entropic_objective(cost.to(torch.float64), qh, prob, ent))
    return q.to(cost.dtype), info


def solve_p2ot(cost: torch.Tensor, rho: float, *, eps: float = 0.1, lam: float = 1.0, tol: float = 1e-6,
               max_iter: int = 1000, init: torch.Tensor | None = None, return_info: bool = False):
    r"""Progressive partial OT (paper Eq. 6) by the virtual-cluster reformulation.

    ``min_Q <Q,C> + lam KL(Q^T 1 || rho/K 1) + eps H(Qh)`` s.t. ``Q 1 <= 1/N``, ``1^T Q 1 = rho``.
    See :func:`solve_transport` for arguments and return values.
    """
    return solve_transport(cost, rho, formulation="p2ot", eps=eps, lam=lam, tol=tol, max_iter=max_iter,
                           init=init, return_info=return_info)
