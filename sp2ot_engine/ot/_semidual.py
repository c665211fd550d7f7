"""The semi-dual ``G(v)`` of one problem: value, gradient, Hessian and the plan at ``v``
(see the package docstring for the formulas)."""
from __future__ import annotations

import numpy as np
import torch

from sp2ot_engine.ot._problem import Problem

# Sparse Gram products (CPU): entries of the row-stochastic P below SPARSE_GRAM_BELOW are left out
# of the Hessian (only the search direction changes, never the solution), for problems with at
# least SPARSE_GRAM_MIN_COLUMNS columns while at most SPARSE_GRAM_MAX_DENSITY of P is kept.
SPARSE_GRAM_BELOW = 1e-7
SPARSE_GRAM_MIN_COLUMNS = 256
SPARSE_GRAM_MAX_DENSITY = 0.05


class SemiDual:
    """Evaluates the semi-dual G(v), its gradient and Hessian for one problem.

    Evaluations use the scaling form: with a reference ``v_ref`` absorbed into
    ``M = exp((v_ref - Ch)/eps - off)`` (``off`` the row maxima, so every row of ``M`` has a
    1), ``G`` and its gradient at ``v`` need only ``b = exp((v - v_ref)/eps)`` and two
    matrix-vector products with ``M``. While ``|v - v_ref| <= 50 eps`` nothing that matters
    can under- or overflow in float64; beyond that ``v`` is absorbed into ``M`` again (one
    ``exp`` pass), which keeps the solver stable for tiny ``eps`` and huge costs.
    """

    absorb_at = 50.0

    def __init__(self, prob: Problem, v: torch.Tensor) -> None:
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
