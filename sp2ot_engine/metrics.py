"""Clustering metrics as in the SP2OT paper (Sec. 6.1.2; method.md "Evaluation").

Given true labels ``y_true`` (``C`` classes) and predicted cluster ids ``y_pred``
(``K`` clusters), both length ``N`` and of any hashable/orderable type (ints, strings):

1. **Matching.** Build the ``C x K`` contingency matrix ``M[c, j] = #{n : y_true_n = c,
   y_pred_n = j}`` and solve ``max sum M[c, pi(c)]`` over one-to-one assignments with
   ``scipy.optimize.linear_sum_assignment(M, maximize=True)``. For ``K != C`` the matrix is
   rectangular and exactly ``min(C, K)`` pairs are matched: every sample of an unmatched
   cluster counts as wrong, and an unmatched class has accuracy 0.
2. **Per-class accuracy** ``acc_c = M[c, pi(c)] / n_c`` (0 for unmatched classes).
3. **ACC** = mean over the ``C`` classes of ``acc_c`` (the paper's balanced accuracy, NOT
   instance accuracy); ``instance_acc = sum_c M[c, pi(c)] / N`` is reported too.
4. **F1** = macro F1 over the true classes, predictions mapped through the matching
   (unmatched clusters map to a label that is no class, i.e. count only as false negatives):
   ``sklearn.metrics.f1_score(labels=classes, average="macro", zero_division=0)``.
5. **NMI** = ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic normalisation),
   **ARI** = ``sklearn.metrics.adjusted_rand_score`` (both instance-level, matching-free).
6. **Head / Medium / Tail** ACC: classes ranked by their size in ``y_true`` (descending;
   ties broken by ascending class label, so the split is deterministic), split 3:4:3:
   ``n_head = n_tail = floor(0.3 * C + 0.5)`` (0.3*C rounded half UP, computed exactly as
   ``(3 * C + 5) // 10``; e.g. C=10 -> 3/4/3, C=100 -> 30/40/30, C=5 -> 2/1/2,
   C=15 -> 5/5/5), medium = the remaining ``C - 2 * n_head`` classes. Each group's value is
   the mean ``acc_c`` over its classes, with the same global matching. A group with no
   classes (only when ``C <= 2``: C=1 has no head/tail, C=2 has no medium) is ``nan``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["evaluate", "match_clusters", "group_sizes"]


@dataclass(frozen=True)
class _Matching:
    classes: np.ndarray  # (C,) sorted unique true labels
    clusters: np.ndarray  # (K,) sorted unique predicted labels
    t: np.ndarray  # (N,) true labels as 0..C-1
    p: np.ndarray  # (N,) predicted labels as 0..K-1
    contingency: np.ndarray  # (C, K) int64
    cluster_to_class: np.ndarray  # (K,) class index of each cluster, -1 if unmatched
    class_correct: np.ndarray  # (C,) matched count per class (0 if unmatched)
    class_size: np.ndarray  # (C,)


def _to_1d(name: str, y: Any) -> np.ndarray:
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(y, torch_mod.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; labels must be integers or strings")
    if arr.dtype.kind == "O":
        try:
            arr = np.asarray(arr.tolist())  # e.g. list of Python strs/ints -> proper dtype
        except Exception as exc:  # pragma: no cover - defensive
            raise ValueError(f"{name} must hold integers or strings: {exc}") from exc
    return arr


def _validate(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _to_1d("y_true", y_true)
    p = _to_1d("y_pred", y_pred)
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and "
                         f"{p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty; need at least one sample")
    return t, p


def _unique_inverse(name: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        uniq, inv = np.unique(y, return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"{name} labels must be mutually comparable (all integers or all "
                         f"strings): {exc}") from exc
    return uniq, inv.reshape(-1).astype(np.int64)


def _match(y_true: Any, y_pred: Any) -> _Matching:
    t_raw, p_raw = _validate(y_true, y_pred)
    classes, t = _unique_inverse("y_true", t_raw)
    clusters, p = _unique_inverse("y_pred", p_raw)
    n_c, n_k = classes.size, clusters.size
    contingency = np.bincount(t * n_k + p, minlength=n_c * n_k).reshape(n_c, n_k)
    row, col = linear_sum_assignment(contingency, maximize=True)
    cluster_to_class = np.full(n_k, -1, dtype=np.int64)
    cluster_to_class[col] = row
    class_correct = np.zeros(n_c, dtype=np.int64)
    class_correct[row] = contingency[row, col]
    return _Matching(classes, clusters, t, p, contingency, cluster_to_class, class_correct,
                     contingency.sum(axis=1))


def _py(v: Any) -> Hashable:
    """numpy scalar -> plain Python scalar (int, str, float, bool)."""
    return v.item() if isinstance(v, np.generic) else v


def match_clusters(y_true: Any, y_pred: Any) -> dict[Hashable, Hashable]:
    """Hungarian matching of predicted clusters to true classes.

    Returns ``{cluster: class}`` (original label values, as plain Python scalars) for the
    ``min(C, K)`` matched pairs that maximise the number of agreeing samples. Clusters left
    unmatched (when ``K > C``) are absent from the dict; their samples count as wrong.

    Raises:
        ValueError: inputs not 1-D, of different lengths, or empty.
    """
    m = _match(y_true, y_pred)
    return {_py(m.clusters[j]): _py(m.classes[c])
            for j, c in enumerate(m.cluster_to_class) if c >= 0}


def group_sizes(n_classes: int) -> tuple[int, int, int]:
    """``(n_head, n_medium, n_tail)`` for ``n_classes`` classes split 3:4:3.

    ``n_head = n_tail = round_half_up(0.3 * C) = (3 * C + 5) // 10``; medium gets the rest.
    """
    if n_classes < 0:
        raise ValueError(f"n_classes must be >= 0, got {n_classes}")
    n_head = (3 * n_classes + 5) // 10
    return n_head, n_classes - 2 * n_head, n_head


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def evaluate(y_true: Any, y_pred: Any) -> dict[str, float]:
    """All paper metrics for one clustering (see the module docstring for definitions).

    Args:
        y_true: ``N`` ground-truth labels (ints or strings; list, numpy or torch).
        y_pred: ``N`` predicted cluster ids (ints or strings); the number of clusters may
            differ from the number of classes.

    Returns:
        ``{"acc", "instance_acc", "nmi", "f1", "ari", "head_acc", "medium_acc",
        "tail_acc"}`` as Python floats. All lie in ``[0, 1]`` except ``ari`` (can be
        slightly negative for worse-than-chance clusterings, as defined by Hubert & Arabie)
        and the head/medium/tail values of an empty group (``nan``, only when ``C <= 2``).

    Raises:
        ValueError: inputs not 1-D, of different lengths, or empty.
    """
    from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

    m = _match(y_true, y_pred)
    n_c = m.classes.size
    per_class = m.class_correct / m.class_size  # every class has >= 1 sample
    mapped = m.cluster_to_class[m.p]  # -1 = unmatched cluster: no class
    f1 = f1_score(m.t, mapped, labels=np.arange(n_c), average="macro", zero_division=0)

    order = np.lexsort((np.arange(n_c), -m.class_size))  # size desc, then label asc
    n_head, n_med, _ = group_sizes(n_c)
    head, med, tail = order[:n_head], order[n_head:n_head + n_med], order[n_head + n_med:]
    return {
        "acc": float(per_class.mean()),
        "instance_acc": float(m.class_correct.sum() / m.t.size),
        "nmi": float(normalized_mutual_info_score(m.t, m.p)),
        "f1": float(f1),
        "ari": float(adjusted_rand_score(m.t, m.p)),
        "head_acc": _mean(per_class[head]),
        "medium_acc": _mean(per_class[med]),
        "tail_acc": _mean(per_class[tail]),
    }
