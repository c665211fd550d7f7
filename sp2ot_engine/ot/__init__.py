r"""Pseudo-label solvers: progressive partial OT (P2OT), its semantic-regularised MM
extension (SP2OT) and the ablation formulations of the paper's Table IV.

All solvers take a cost matrix ``C`` (``N x K``, typically ``-log softmax(logits)``) as a
torch tensor and return a transport plan ``Q`` (``N x K``) on the same device and with the
same dtype. ``Q`` is *not* multiplied by ``N``: the pseudo-labels are ``N * Q``.

The P2OT problem is

.. math::
    \min_{Q \ge 0} \langle Q, C\rangle + \lambda\,\mathrm{KL}(Q^\top 1_N \,\|\, \tfrac{\rho}{K} 1_K)
    \quad \text{s.t.} \quad Q 1_K \le \tfrac1N 1_N,\; 1_N^\top Q 1_K = \rho.

With a virtual cluster column ``xi`` absorbing the unselected mass, ``Qh = [Q, xi]``,
``Ch = [C, 0]``, rows of ``Qh`` sum exactly to ``1/N``, the virtual column sums exactly to
``1 - rho``, and the ``K`` real columns are tied to ``rho/K`` by ``lam * KL``. Adding the
entropy ``eps * sum Qh (log Qh - 1)`` gives an unbalanced entropic OT problem whose dual is

.. math::
    \max_{u, v} \tfrac1N\sum_i u_i + \sum_{j \in H} \beta_j v_j
      - \sum_{j \in S} \lambda\beta_j (e^{-v_j/\lambda} - 1)
      - \varepsilon \sum_{ij} e^{(u_i + v_j - Ch_{ij})/\varepsilon}

(``H`` the columns with an exact marginal, ``S`` those with a KL penalty). Eliminating ``u``
in closed form leaves the smooth concave *semi-dual* in the ``K+1`` column potentials

.. math::
    G(v) = -\tfrac{\varepsilon}{N}\sum_i \mathrm{LSE}_j\big((v_j - Ch_{ij})/\varepsilon\big)
      + \sum_{j \in H} \beta_j v_j - \sum_{j\in S} \lambda\beta_j (e^{-v_j/\lambda} - 1) + c,

with gradient ``t(v) - Qh(v)^T 1`` (target minus column sums) and Hessian
``-(1/eps) (diag(col) - Qh^T diag(N) Qh) - diag(t_S / lam)``. We maximise it with a damped
Newton method: every iteration costs one pass over the ``N x (K+1)`` matrix plus one
``(K+1) x (K+1)`` Gram product, and it converges in tens of passes where the scaling loop
(Chizat et al. 2018) needs hundreds to thousands. Three shortcuts change only the path, not
the solution: with many rows per column the start is the solution on every 8th row (within
sampling error of the full one, so most damped steps run on an eighth of the data); near the
optimum the Cholesky factor is reused while it still cuts the error tenfold per step; and with
many columns, where each row of the plan has mass on a few of them, the Gram product runs
sparse over the entries above 1e-7. The fixed point is the same plan as the scaling
iterations of ``method.md`` (tests check it against the log-domain scaling reference and
against POT).

The package holds one private module per concern, re-exported here: ``_checks`` (input
checks), ``_problem`` (the shared problem set-up, objective and :class:`SolverInfo`),
``_semidual`` (``G``, its gradient and Hessian), ``_newton`` (the damped Newton core and
:func:`solve_transport` / :func:`solve_p2ot`), ``_mm`` (:func:`solve_sp2ot`, the
majorise-minimise loop) and ``_schedules`` (:func:`rho_schedule`, :func:`semantic_strength`).
"""
# The tuning constants (upper case) are importable here as before, for reading: the solver
# reads them in ``_newton`` and ``_semidual``, so code that changes one must patch it there.
from sp2ot_engine.ot._mm import solve_sp2ot, sp2ot_objective
from sp2ot_engine.ot._newton import (
    COARSE_MIN_ROWS_PER_COLUMN,
    COARSE_STRIDE,
    COARSE_TOL,
    REUSE_BELOW,
    solve_p2ot,
    solve_transport,
)
from sp2ot_engine.ot._problem import FORMULATIONS, Formulation, SolverInfo
from sp2ot_engine.ot._schedules import rho_schedule, semantic_strength
from sp2ot_engine.ot._semidual import SPARSE_GRAM_BELOW, SPARSE_GRAM_MAX_DENSITY, SPARSE_GRAM_MIN_COLUMNS

__all__ = [
    "FORMULATIONS",
    "Formulation",
    "SolverInfo",
    "rho_schedule",
    "semantic_strength",
    "solve_p2ot",
    "solve_sp2ot",
    "solve_transport",
    "sp2ot_objective",
]
