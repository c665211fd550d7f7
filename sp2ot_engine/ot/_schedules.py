"""Training schedules: the transported mass ``rho(t)`` and the semantic strength ``lam_s(rho)``."""
from __future__ import annotations

import math
from typing import Literal


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
