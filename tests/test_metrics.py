"""Tests for sp2ot_engine.metrics on hand-computed cases (derivations in the comments)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from sp2ot_engine.metrics import evaluate, group_sizes, match_clusters

KEYS = {"acc", "instance_acc", "nmi", "f1", "ari", "head_acc", "medium_acc", "tail_acc"}


def test_perfect_clustering_with_permuted_labels() -> None:
    y_true = [0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
    y_pred = [7, 7, 3, 3, 3, 5, 5, 5, 5, 0]  # a relabelling: every metric is exactly 1
    r = evaluate(y_true, y_pred)
    assert set(r) == KEYS
    assert all(isinstance(v, float) for v in r.values())
    for key, value in r.items():
        assert value == pytest.approx(1.0, abs=1e-12), key
    assert match_clusters(y_true, y_pred) == {7: 0, 3: 1, 5: 2, 0: 3}


def test_imbalanced_per_class_mean_differs_from_instance_accuracy() -> None:
    # classes: 0 x6, 1 x2, 2 x2 (N = 10)
    y_true = [0] * 6 + [1] * 2 + [2] * 2
    y_pred = [0] * 5 + [1] + [1, 1] + [0, 2]
    # contingency (rows classes, cols clusters 0,1,2):
    #   class 0: [5, 1, 0];  class 1: [0, 2, 0];  class 2: [1, 0, 1]
    # best matching 0->0, 1->1, 2->2 with 5 + 2 + 1 = 8 correct (every alternative is lower)
    # per-class acc: 5/6, 2/2, 1/2  -> ACC = (5/6 + 1 + 1/2) / 3 = 7/9
    # instance acc: 8/10
    # F1: class0 TP5 FP1 FN1 -> 10/12; class1 TP2 FP1 FN0 -> 4/5; class2 TP1 FP0 FN1 -> 2/3
    #     macro = (5/6 + 4/5 + 2/3) / 3 = 69/90
    # ARI: sum C(n_ij,2) = C(5,2) + C(2,2) = 11; rows a = 6,2,2 -> 15+1+1 = 17;
    #      cols b = 6,3,1 -> 15+3+0 = 18; C(10,2) = 45; E = 17*18/45 = 6.8; max = 17.5
    #      ARI = (11 - 6.8) / (17.5 - 6.8) = 4.2 / 10.7
    # NMI (arithmetic): MI = .5 ln(.5/.36) + .1 ln(.1/.18) + .2 ln(.2/.06) + .1 ln(.1/.12)
    #      + .1 ln(.1/.02) = 0.4889795; H(true) = 0.9502705, H(pred) = 0.8979457
    #      NMI = MI / ((H_t + H_p) / 2) = 0.4889796 / 0.9241081 = 0.529137
    # groups (C=3 -> 1/1/1): sizes 6,2,2, tie between 1 and 2 broken by label:
    #      head = {0}: 5/6, medium = {1}: 1, tail = {2}: 1/2
    r = evaluate(y_true, y_pred)
    assert r["acc"] == pytest.approx(7 / 9)
    assert r["instance_acc"] == pytest.approx(0.8)
    assert r["acc"] != pytest.approx(r["instance_acc"])
    assert r["f1"] == pytest.approx(69 / 90)
    assert r["ari"] == pytest.approx(4.2 / 10.7)
    mi = (.5 * math.log(.5 / .36) + .1 * math.log(.1 / .18) + .2 * math.log(.2 / .06)
          + .1 * math.log(.1 / .12) + .1 * math.log(.1 / .02))
    h_t = -(.6 * math.log(.6) + 2 * .2 * math.log(.2))
    h_p = -(.6 * math.log(.6) + .3 * math.log(.3) + .1 * math.log(.1))
    assert r["nmi"] == pytest.approx(mi / ((h_t + h_p) / 2))
    assert r["nmi"] == pytest.approx(0.529137, abs=1e-6)
    assert r["head_acc"] == pytest.approx(5 / 6)
    assert r["medium_acc"] == pytest.approx(1.0)
    assert r["tail_acc"] == pytest.approx(0.5)


def test_more_clusters_than_classes() -> None:
    # classes 0 x6, 1 x3; clusters 0,1,2,3 (K=4 > C=2)
    y_true = [0] * 6 + [1] * 3
    y_pred = [0, 0, 0, 0, 0, 1, 2, 2, 3]
    # class 0: cluster0 5, cluster1 1;  class 1: cluster2 2, cluster3 1
    # matching 0->0 (5), 2->1 (2); clusters 1 and 3 unmatched: their samples are wrong
    # per-class: 5/6, 2/3 -> ACC = (5/6 + 2/3)/2 = 3/4; instance = 7/9
    # F1: class0 TP5 FP0 FN1 -> 10/11; class1 TP2 FP0 FN1 -> 4/5; macro = (10/11 + 4/5)/2
    r = evaluate(y_true, y_pred)
    assert r["acc"] == pytest.approx(0.75)
    assert r["instance_acc"] == pytest.approx(7 / 9)
    assert r["f1"] == pytest.approx((10 / 11 + 4 / 5) / 2)
    assert match_clusters(y_true, y_pred) == {0: 0, 2: 1}


def test_fewer_clusters_than_classes() -> None:
    # classes 0 x4, 1 x3, 2 x1; clusters 0,1 (K=2 < C=3)
    y_true = [0] * 4 + [1] * 3 + [2]
    y_pred = [0] * 4 + [0, 1, 1] + [1]
    # class 0: c0 4; class 1: c0 1, c1 2; class 2: c1 1
    # matching 0->0 (4), 1->1 (2) = 6 (beats 1->class2 = 5); class 2 unmatched -> acc 0
    # per-class 1, 2/3, 0 -> ACC = 5/9; instance = 6/8
    # F1: class0 TP4 FP1 FN0 -> 8/9; class1 TP2 FP1 FN1 -> 2/3; class2 0 -> macro 14/27
    # groups (1/1/1 by size 4,3,1): head 1, medium 2/3, tail 0
    r = evaluate(y_true, y_pred)
    assert r["acc"] == pytest.approx(5 / 9)
    assert r["instance_acc"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(14 / 27)
    assert (r["head_acc"], r["medium_acc"], r["tail_acc"]) == pytest.approx((1, 2 / 3, 0))
    assert match_clusters(y_true, y_pred) == {0: 0, 1: 1}


def test_single_cluster() -> None:
    # everything in one cluster: it matches the largest class (8 of 10)
    # per-class 1, 0 -> ACC 0.5; instance 0.8; F1: class0 TP8 FP2 -> 16/18, class1 0 -> 4/9
    # constant prediction: NMI 0, ARI 0; C=2 -> head 1 class, medium empty (nan), tail 1
    r = evaluate([0] * 8 + [1] * 2, [4] * 10)
    assert r["acc"] == pytest.approx(0.5)
    assert r["instance_acc"] == pytest.approx(0.8)
    assert r["f1"] == pytest.approx(4 / 9)
    assert r["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert r["ari"] == pytest.approx(0.0, abs=1e-12)
    assert r["head_acc"] == 1.0 and r["tail_acc"] == 0.0 and math.isnan(r["medium_acc"])


def test_head_medium_tail_ten_classes_decreasing_sizes() -> None:
    # class c has n_c = 10 - c samples (sizes 10..1); groups 3/4/3:
    #   head {0,1,2}: all correct (cluster c)                         -> 1, 1, 1
    #   medium {3,4,5,6}: m_c correct in cluster c, rest in a private junk cluster 100+c
    #       (m_c > n_c - m_c so c -> c is the better match): 4/7, 4/6, 3/5, 3/4
    #   tail {7,8,9}: all samples put in cluster 0 (dominated by class 0's 10) -> 0, 0, 0
    # matching keeps the diagonal: 10+9+8+4+4+3+3 = 41 correct of 55
    sizes = [10 - c for c in range(10)]
    correct = {3: 4, 4: 4, 5: 3, 6: 3}
    y_true, y_pred = [], []
    for c, n in enumerate(sizes):
        y_true += [c] * n
        if c <= 2:
            y_pred += [c] * n
        elif c <= 6:
            y_pred += [c] * correct[c] + [100 + c] * (n - correct[c])
        else:
            y_pred += [0] * n
    perm = np.random.default_rng(0).permutation(len(y_true))  # order must not matter
    r = evaluate(np.array(y_true)[perm], np.array(y_pred)[perm])
    medium = [4 / 7, 4 / 6, 3 / 5, 3 / 4]
    assert r["head_acc"] == pytest.approx(1.0)
    assert r["medium_acc"] == pytest.approx(sum(medium) / 4)  # 0.647024
    assert r["tail_acc"] == pytest.approx(0.0)
    assert r["acc"] == pytest.approx((3 + sum(medium)) / 10)  # 0.558810
    assert r["instance_acc"] == pytest.approx(41 / 55)


def test_head_medium_tail_ties_broken_by_label_not_order_of_appearance() -> None:
    # 10 string classes "a".."j", all of size 4: the ranking is pure tie -> by label:
    #   head = a,b,c; medium = d,e,f,g; tail = h,i,j
    # a,b,c: all 4 in their own cluster -> 1
    # d..g: 3 in own cluster, 1 in a private junk cluster -> 3/4
    # h,i,j: 2 samples each in two head classes' clusters (which those classes own with 4) -> 0
    names = "abcdefghij"
    tail_into = {"h": ("A", "B"), "i": ("B", "C"), "j": ("C", "A")}
    y_true, y_pred = [], []
    for name in reversed(names):  # tail classes appear first in the arrays
        y_true += [name] * 4
        if name in "abc":
            y_pred += [name.upper()] * 4
        elif name in "defg":
            y_pred += [name.upper()] * 3 + ["junk-" + name]
        else:
            y_pred += [tail_into[name][0]] * 2 + [tail_into[name][1]] * 2
    r = evaluate(y_true, y_pred)
    assert r["head_acc"] == pytest.approx(1.0)
    assert r["medium_acc"] == pytest.approx(0.75)
    assert r["tail_acc"] == pytest.approx(0.0)
    assert r["acc"] == pytest.approx((3 + 4 * 0.75) / 10)


def test_string_labels() -> None:
    y_true = ["cat", "cat", "dog", "dog", "emu"]
    y_pred = ["x", "x", "y", "y", "y"]
    # x -> cat (2), y -> dog (2); emu unmatched -> 0: ACC = 2/3, instance = 4/5
    # F1: cat 1, dog TP2 FP1 FN0 -> 4/5, emu 0 -> macro 0.6
    # groups: sizes cat 2, dog 2, emu 1 -> head cat (label tie-break) 1, medium dog 1, tail emu 0
    r = evaluate(y_true, y_pred)
    assert r["acc"] == pytest.approx(2 / 3)
    assert r["instance_acc"] == pytest.approx(0.8)
    assert r["f1"] == pytest.approx(0.6)
    assert (r["head_acc"], r["medium_acc"], r["tail_acc"]) == pytest.approx((1, 1, 0))
    mapping = match_clusters(y_true, y_pred)
    assert mapping == {"x": "cat", "y": "dog"}
    assert all(type(k) is str and type(v) is str for k, v in mapping.items())


def test_mixed_input_types_agree() -> None:
    y_true = [3, 3, 1, 1, 1, 9]
    y_pred = [-1, 0, 0, 0, 5, 5]  # -1 is just another cluster id
    ref = evaluate(y_true, y_pred)
    assert evaluate(np.array(y_true), np.array(y_pred)) == ref
    assert evaluate(torch.tensor(y_true), torch.tensor(y_pred)) == ref
    assert evaluate(tuple(map(str, y_true)), np.array(y_pred)) == ref  # labels "1","3","9"
    assert match_clusters(torch.tensor(y_true), torch.tensor(y_pred)) == \
        match_clusters(y_true, y_pred)
    assert all(type(k) is int for k in match_clusters(np.array(y_true), np.array(y_pred)))


def _brute_force_best(cont: np.ndarray) -> tuple[int, np.ndarray]:
    """Best one-to-one matching by enumeration: (total, per-class matched counts)."""
    n_c, n_k = cont.shape
    best, best_per = -1, None
    if n_k >= n_c:
        for cols in itertools.permutations(range(n_k), n_c):
            per = cont[np.arange(n_c), list(cols)]
            if per.sum() > best:
                best, best_per = int(per.sum()), per
    else:
        for rows in itertools.permutations(range(n_c), n_k):
            per = np.zeros(n_c, dtype=int)
            per[list(rows)] = cont[list(rows), np.arange(n_k)]
            if per.sum() > best:
                best, best_per = int(per.sum()), per
    return best, best_per


@pytest.mark.parametrize("n_c,n_k", [(4, 4), (4, 6), (5, 3), (3, 5)])
def test_random_against_enumeration_and_formulas(n_c: int, n_k: int) -> None:
    rng = np.random.default_rng(n_c * 10 + n_k)
    for _ in range(5):
        y_true = rng.integers(0, n_c, 40)
        y_true[:n_c] = np.arange(n_c)  # every class present
        y_pred = rng.integers(0, n_k, 40)
        y_pred[:n_k] = np.arange(n_k)
        cont = np.zeros((n_c, n_k), dtype=int)
        np.add.at(cont, (y_true, y_pred), 1)
        best, _ = _brute_force_best(cont)
        r = evaluate(y_true, y_pred)
        assert r["instance_acc"] == pytest.approx(best / 40)
        # the chosen matching: per-class accuracies and macro F1 from its contingency counts
        mapping = match_clusters(y_true, y_pred)
        assert len(mapping) == min(n_c, n_k)
        assert len(set(mapping.values())) == len(mapping)  # one-to-one
        assert sum(cont[c, j] for j, c in mapping.items()) == best
        sizes = cont.sum(1)
        per_class = np.zeros(n_c)
        f1 = np.zeros(n_c)
        for j, c in mapping.items():
            tp = cont[c, j]
            fp = cont[:, j].sum() - tp
            fn = sizes[c] - tp
            per_class[c] = tp / sizes[c]
            f1[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        assert r["acc"] == pytest.approx(per_class.mean())
        assert r["f1"] == pytest.approx(f1.mean())
        assert r["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
        assert r["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred))
        for key in ("acc", "instance_acc", "nmi", "f1", "head_acc", "medium_acc", "tail_acc"):
            assert 0.0 <= r[key] <= 1.0


@pytest.mark.parametrize(
    "c,expected",
    [(1, (0, 1, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (4, (1, 2, 1)), (5, (2, 1, 2)),
     (10, (3, 4, 3)), (15, (5, 5, 5)), (25, (8, 9, 8)), (100, (30, 40, 30))],
)
def test_group_sizes_round_half_up(c: int, expected: tuple[int, int, int]) -> None:
    # 0.3*C rounded half up: 0.3 -> 0, 0.6 -> 1, 1.5 -> 2, 4.5 -> 5, 7.5 -> 8
    assert group_sizes(c) == expected


@pytest.mark.parametrize(
    "y_true,y_pred,match",
    [
        ([0, 1, 2], [0, 1], r"same length.*3 and 2"),
        ([], [], r"empty"),
        (np.zeros((2, 2)), np.zeros((2, 2)), r"y_true must be a 1-D.*\(2, 2\)"),
        ([0, 1], np.zeros((2, 1)), r"y_pred must be a 1-D"),
        ([0.0, float("nan")], [0, 1], r"NaN"),
        (5, 5, r"1-D"),
    ],
)
def test_bad_inputs(y_true, y_pred, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate(y_true, y_pred)
    with pytest.raises(ValueError, match=match):
        match_clusters(y_true, y_pred)
