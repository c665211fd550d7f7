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
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

Formulation = Literal["p2ot", "pot", "uot", "ot"]
FORMULATIONS: tuple[str, ...] = ("p2ot", "pot", "uot", "ot")


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


# --------------------------------------------------------------------------------------
# validation


def _check_cost(cost: torch.Tensor) -> None:
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


def _check_params(rho: float, eps: float, lam: float, tol: float, max_iter: int) -> None:
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


# --------------------------------------------------------------------------------------
# problem set-up shared by the formulations


@dataclass
class _Problem:
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


def _make_problem(cost: torch.Tensor, rho: float, formulation: str, eps: float, lam: float) -> _Problem:
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
    return _Problem(neg_cost_eps=neg_cost_eps, beta=beta, soft=soft, eps=eps, lam=lam, n_real=k)


# Sparse Gram products (CPU): entries of the row-stochastic P below SPARSE_GRAM_BELOW are left out
# of the Hessian (only the search direction changes, never the solution), for problems with at
# least SPARSE_GRAM_MIN_COLUMNS columns while at most SPARSE_GRAM_MAX_DENSITY of P is kept.
SPARSE_GRAM_BELOW = 1e-7
SPARSE_GRAM_MIN_COLUMNS = 256
SPARSE_GRAM_MAX_DENSITY = 0.05


class _SemiDual:
    """Evaluates the semi-dual G(v), its gradient and Hessian for one problem.

    Evaluations use the scaling form: with a reference ``v_ref`` absorbed into
    ``M = exp((v_ref - Ch)/eps - off)`` (``off`` the row maxima, so every row of ``M`` has a
    1), ``G`` and its gradient at ``v`` need only ``b = exp((v - v_ref)/eps)`` and two
    matrix-vector products with ``M``. While ``|v - v_ref| <= 50 eps`` nothing that matters
    can under- or overflow in float64; beyond that ``v`` is absorbed into ``M`` again (one
    ``exp`` pass), which keeps the solver stable for tiny ``eps`` and huge costs.
    """

    absorb_at = 50.0

    def __init__(self, prob: _Problem, v: torch.Tensor) -> None:
        self.p = prob
        self.n = prob.neg_cost_eps.shape[0]
        self.kernel = torch.empty_like(prob.neg_cost_eps)
        self.gram_buffer: torch.Tensor | None = None  # P for the Gram product, reused every iteration
        self.sparse_buffer: torch.Tensor | None = None
        # With many columns a row of P has mass on few of them: a sparse product is far cheaper.
        self.sparse_gram = self.kernel.device.type == "cpu" and prob.neg_cost_eps.shape[1] >= SPARSE_GRAM_MIN_COLUMNS
        self.absorb(v)
        m = prob.neg_cost_eps.shape[1]
        # float32 Gram products are twice as fast but limit the attainable accuracy of the
        # Newton direction; small problems, and any solve whose progress stalls, use float64.
        self.precise = self.n * m * m <= 20_000_000

    def absorb(self, v: torch.Tensor) -> None:
        p = self.p
        # exp is ~10x slower where its result is denormal or zero: exponents below -300 are
        # floored there and their entries then set to exactly 0, as exp would round most of them.
        if not bool(v.any()):  # rows of -Ch/eps already peak at exactly 0
            torch.clamp(p.neg_cost_eps, min=-300.0, out=self.kernel)
            self.offset = v.new_zeros(self.n)
        else:
            torch.add(p.neg_cost_eps, v / p.eps, out=self.kernel)
            self.offset = self.kernel.amax(dim=1)
            self.kernel.sub_(self.offset.unsqueeze(1)).clamp_(min=-300.0)
        torch.nn.functional.threshold_(self.kernel.exp_(), 1e-130, 0.0)  # e^-300 = 5.1e-131
        self.kernel32 = None  # float32 copy for the Gram product, made on first use
        self.v_ref = v.clone()

    def evaluate(self, v: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (G(v), gradient t(v) - col, column sums col of Qh, row sums s of M diag(b))."""
        p = self.p
        shift = (v - self.v_ref) / p.eps
        if float(shift.abs().max()) > self.absorb_at:
            self.absorb(v)
            shift = torch.zeros_like(v)
        b = shift.exp()
        s = self.kernel @ b
        lse_mean = (s.log() + self.offset).mean()
        col = b * (self.kernel.T @ (1.0 / (self.n * s)))
        g_val = -p.eps * lse_mean + self._column_terms(v)
        self.b = b
        return float(g_val), self.target(v) - col, col, s

    def target(self, v: torch.Tensor) -> torch.Tensor:
        """Column targets: beta_j exp(-v_j/lam) on KL-tied columns, beta_j on exact ones."""
        p = self.p
        return torch.where(p.soft, p.beta * torch.exp(-v / p.lam), p.beta)

    def _column_terms(self, v: torch.Tensor) -> torch.Tensor:
        p = self.p
        hard = torch.where(p.soft, 0.0, p.beta * v).sum()
        soft = torch.where(p.soft, p.lam * p.beta * (torch.exp(-v / p.lam) - 1.0), 0.0).sum()
        return hard - soft

    def neg_hessian(self, v: torch.Tensor, col: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """-H = (1/eps)(diag(col) - P^T P / N) + diag(t_soft / lam), P = N Qh = diag(1/s) M diag(b).

        The ``N (K+1)^2`` Gram product dominates the cost; it runs in float32 unless
        ``precise`` is set. The gradient stays exact, so this only changes the search
        direction, never the solution.
        """
        p = self.p
        gram = self._sparse_gram(s) if self.sparse_gram else None
        if gram is None:
            gram = self._dense_gram(s)
        h = (torch.diag(col) - gram) / p.eps
        h.diagonal().add_(torch.where(p.soft, self.target(v) / p.lam, 0.0))
        return h

    def _sparse_gram(self, s: torch.Tensor) -> torch.Tensor | None:
        """``P^T P / N`` over the entries of ``P`` above ``SPARSE_GRAM_BELOW`` (CPU, float64), or
        ``None`` (and dense products from then on) when too many entries are that large."""
        import scipy.sparse as sp

        if self.sparse_buffer is None:
            self.sparse_buffer = torch.empty_like(self.kernel)
        pf = torch.mul(self.kernel, self.b.unsqueeze(0), out=self.sparse_buffer)
        pf.mul_((1.0 / s).unsqueeze(1))
        n, m = pf.shape
        dense = pf.numpy()
        flat = np.flatnonzero(dense > SPARSE_GRAM_BELOW)
        if flat.size > SPARSE_GRAM_MAX_DENSITY * n * m:
            self.sparse_gram = False
            self.sparse_buffer = None
            return None
        indptr = np.searchsorted(flat, np.arange(n + 1) * m)
        a = sp.csr_matrix((dense.ravel()[flat], flat % m, indptr), shape=(n, m))
        return torch.from_numpy((a.T @ a).toarray()).div_(n)

    def _dense_gram(self, s: torch.Tensor) -> torch.Tensor:
        """``P^T P / N`` as a dense product (float32 unless ``precise``)."""
        dtype = torch.float64 if self.precise else torch.float32
        if self.gram_buffer is None or self.gram_buffer.dtype != dtype:
            self.gram_buffer = torch.empty(self.kernel.shape, dtype=dtype, device=self.kernel.device)
        pf = self.gram_buffer
        if self.precise:
            torch.mul(self.kernel, self.b.unsqueeze(0), out=pf)
        else:
            if self.kernel32 is None:
                # float32 copy; entries that would be float32 denormals are dropped (they are
                # < 1e-30 of the row maximum and make BLAS crawl).
                self.kernel32 = torch.nn.functional.threshold_(self.kernel.to(torch.float32), 1e-30, 0.0)
            # P = diag(1/s) M diag(b) is row-stochastic, so float32 cannot overflow (b and 1/s
            # stay within e^{+-50} of 1 between absorptions).
            torch.mul(self.kernel32, self.b.to(torch.float32).unsqueeze(0), out=pf)
        pf.mul_((1.0 / s).to(dtype).unsqueeze(1))
        # Products of entries below ~1e-19 are float32 denormals, which make the Gram product
        # several times slower on x86; such entries cannot affect it anyway.
        if not self.precise:
            torch.nn.functional.threshold_(pf, 1e-19, 0.0)
        return (pf.T @ pf).to(torch.float64) / self.n

    def plan(self, s: torch.Tensor, col: torch.Tensor, entropy: bool = True) -> tuple[torch.Tensor, float | None]:
        """``(Qh, sum Qh (log Qh - 1))`` at the last evaluated point (Qh reuses the kernel buffer);
        the entropy is ``None`` unless asked for.

        ``log Qh_ij = -Ch_ij/eps + v_j/eps - off_i - log(N s_i)``, so the entropy needs one
        dot product with the cost instead of a logarithm per entry.
        """
        p = self.p
        qh = self.kernel.mul_(self.b).mul_((1.0 / (self.n * s)).unsqueeze(1))
        if not entropy:
            return qh, None
        v = self.v_ref + p.eps * torch.log(self.b)
        ent = float((qh * p.neg_cost_eps).sum() + (col * v).sum() / p.eps
                    - (self.offset + torch.log(self.n * s)).sum() / self.n) - float(col.sum())
        return qh, ent


# Coarse start: with many rows per column, the potentials solved on every COARSE_STRIDE-th row
# (to COARSE_TOL) are within sampling error of the full solution, which skips most of the
# damped global phase of Newton on the full problem for an eighth of its cost.
COARSE_STRIDE = 8
COARSE_MIN_ROWS_PER_COLUMN = 4
COARSE_TOL = 1e-2
# Once full Newton steps have brought the marginal error below this, the last Cholesky factor
# is reused while it keeps cutting the error tenfold per step.
REUSE_BELOW = 1e-2


def _coarse_start(prob: _Problem) -> torch.Tensor | None:
    """Potentials of the problem restricted to every ``COARSE_STRIDE``-th row, or ``None`` when
    too few rows per column would remain for them to be close to the full problem's."""
    n, m = prob.neg_cost_eps.shape
    if n < COARSE_STRIDE * COARSE_MIN_ROWS_PER_COLUMN * m:
        return None
    sub = _Problem(neg_cost_eps=prob.neg_cost_eps[::COARSE_STRIDE].contiguous(), beta=prob.beta,
                   soft=prob.soft, eps=prob.eps, lam=prob.lam, n_real=prob.n_real)
    return _newton(sub, None, COARSE_TOL, 100, entropy=False)[0]


def _newton(prob: _Problem, v0: torch.Tensor | None, tol: float, max_iter: int, entropy: bool = True):
    """Maximise the semi-dual by damped Newton.

    Returns ``(v, Qh, n_iter, err, entropy)``: the plan ``Qh`` at the final potentials ``v``,
    its marginal error and ``sum Qh (log Qh - 1)`` (``None`` unless ``entropy``).
    """
    m = prob.beta.shape[0]
    if v0 is None:
        v0 = _coarse_start(prob)
    v = prob.beta.new_zeros(m) if v0 is None else v0.to(prob.beta).clone()
    sd = _SemiDual(prob, v)
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


# --------------------------------------------------------------------------------------
# objectives


def _entropic_objective(cost: torch.Tensor, qh: torch.Tensor, prob: _Problem, entropy: float | None = None) -> float:
    """<Qh, Ch> + eps sum Qh(log Qh - 1) + lam sum_soft KL(col_j || beta_j), on the unshifted cost."""
    k = prob.n_real
    lin = float((qh[:, :k] * cost).sum())
    if entropy is None:
        entropy = float(torch.special.xlogy(qh, qh).sum() - qh.sum())
    col = qh.sum(dim=0)
    kl = torch.special.xlogy(col, col) - col * torch.log(prob.beta) - col + prob.beta
    return lin + prob.eps * entropy + prob.lam * float(kl[prob.soft].sum())


def _adapt_init(init: torch.Tensor | None, m: int, n_real: int) -> torch.Tensor | None:
    """Reuse potentials from a solve with (or without) the virtual column."""
    if init is None:
        return None
    init = torch.as_tensor(init, dtype=torch.float64).flatten()
    if init.numel() == m:
        return init
    if init.numel() in (n_real, n_real + 1) and m in (n_real, n_real + 1):
        return torch.cat([init[:n_real], init.new_zeros(m - n_real)])
    raise ValueError(f"init has {init.numel()} potentials; expected {m} for this problem")


# --------------------------------------------------------------------------------------
# public solvers


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
    _check_cost(cost)
    _check_params(rho, eps, lam, tol, max_iter)
    prob = _make_problem(cost, float(rho), formulation, float(eps), float(lam))
    v0 = _adapt_init(init, prob.beta.shape[0], prob.n_real)
    v, qh, it, err, ent = _newton(prob, v0.to(prob.beta.device) if v0 is not None else None, tol, int(max_iter),
                                  entropy=return_info)
    q = qh[:, : prob.n_real]
    if not return_info:
        return q.to(cost.dtype)
    info = SolverInfo(n_iter=it, n_inner=it, marginal_error=err, converged=err < tol, potentials=v,
                      objective=_entropic_objective(cost.to(torch.float64), qh, prob, ent))
    return q.to(cost.dtype), info


def solve_p2ot(cost: torch.Tensor, rho: float, *, eps: float = 0.1, lam: float = 1.0, tol: float = 1e-6,
               max_iter: int = 1000, init: torch.Tensor | None = None, return_info: bool = False):
    r"""Progressive partial OT (paper Eq. 6) by the virtual-cluster reformulation.

    ``min_Q <Q,C> + lam KL(Q^T 1 || rho/K 1) + eps H(Qh)`` s.t. ``Q 1 <= 1/N``, ``1^T Q 1 = rho``.
    See :func:`solve_transport` for arguments and return values.
    """
    return solve_transport(cost, rho, formulation="p2ot", eps=eps, lam=lam, tol=tol, max_iter=max_iter,
                           init=init, return_info=return_info)


def _to_sym_sparse(graph, n: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
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
    _check_cost(cost)
    _check_params(rho, eps, lam, tol, max_iter)
    if not lam_s >= 0:
        raise ValueError(f"lam_s must be >= 0, got {lam_s!r}")
    n, k = cost.shape
    # The sparse product runs in the cost's precision: float32 costs (as training passes)
    # take torch's much faster float32 sparse kernel; float64 costs get an exact product.
    sdtype = torch.float32 if cost.dtype == torch.float32 else torch.float64
    sym = _to_sym_sparse(graph, n, cost.device, sdtype)
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
        prob = _make_problem(c64 - lam_s * sq, float(rho), formulation, float(eps), float(lam))
        v0 = _adapt_init(v, prob.beta.shape[0], k)
        # Inner solves at least as tight as the MM rule, so its decisions are not rounding noise.
        v, qh, it, err, ent = _newton(prob, v0.to(prob.beta.device) if v0 is not None else None,
                                      min(tol, mm_tol), int(max_iter))
        inner += it
        q = qh[:, :k]
        sq = semantic_product(q)  # reused by the next step's linearisation
        f_new = _entropic_objective(c64, qh, prob, ent) - lam_s * 0.5 * float((q * sq).sum())
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
    prob = _make_problem(cost.detach(), float(rho), formulation, float(eps), float(lam))
    qh = q
    if prob.beta.shape[0] > k:
        qh = torch.cat([q, (1.0 / n - q.sum(dim=1, keepdim=True)).clamp_min(0.0)], dim=1)
    value = _entropic_objective(cost.to(torch.float64), qh, prob)
    if lam_s:
        sym = _to_sym_sparse(graph, n, cost.device)
        value -= lam_s * 0.5 * float((q * torch.sparse.mm(sym, q)).sum())
    return value


# --------------------------------------------------------------------------------------
# schedules


def rho_schedule(step: int, total: int, rho0: float = 0.1, kind: Literal["sigmoid", "linear", "fixed"] = "sigmoid") -> float:
    r"""Total mass ``rho`` at training step ``step`` of ``total`` (the curriculum).

    - ``"sigmoid"`` (paper): ``rho0 + (1 - rho0) exp(-5 (1 - t/T)^2)``,
    - ``"linear"``: ``rho0 + (1 - rho0) t/T``,
    - ``"fixed"``: ``rho0``.

    ``t/T`` is clipped to ``[0, 1]``; the result lies in ``(0, 1]``.
    """
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if not 0.0 < rho0 <= 1.0:
        raise ValueError(f"rho0 must be in (0, 1], got {rho0}")
    frac = min(max(step / total, 0.0), 1.0)
    if kind == "sigmoid":
        return rho0 + (1.0 - rho0) * math.exp(-5.0 * (1.0 - frac) ** 2)
    if kind == "linear":
        return rho0 + (1.0 - rho0) * frac
    if kind == "fixed":
        return rho0
    raise ValueError(f"unknown rho schedule {kind!r}: choose sigmoid, linear or fixed")


def semantic_strength(rho: float, lam0: float = 1000.0, n: int = 5120, reference_n: int = 5120) -> float:
    r"""Strength of the semantic term, ``lam_s = lam0 (1 - rho) n / reference_n``.

    The prior fades as ``rho -> 1`` (the model becomes reliable). Plan entries scale as
    ``1/n``, so the semantic term's weight relative to ``<Q, C>`` scales as ``k/n``; the
    factor ``n / reference_n`` keeps the regularisation of a memory bank of ``n`` rows equal
    to the paper's (``lam0 = 1000`` at ``reference_n = 5120``).
    """
    return lam0 * (1.0 - rho) * n / reference_n
