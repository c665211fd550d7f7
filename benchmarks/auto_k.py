"""Choosing K without being told: each criterion of ``sp2ot_engine.auto_k`` on the long-tailed sets.

    python benchmarks/auto_k.py                         # the four dev sets, every criterion
    python benchmarks/auto_k.py --sets all --fit-epochs 10

For every set of ``lt_sets.py`` (true K = 10 classes) and every criterion: the K chosen in the
default range (``default_k_range``: 2 .. min(50, N // 20)), whether it is within 30 % of the truth,
and the ACC (percent, ``sp2ot_engine.metrics.evaluate``) of a clustering with the chosen K against
one with the true K. The clustering is the spectral start of ``sp2ot_engine.starts``
(``spectral_partition`` on the cosine 20-NN graph) by default; ``--fit-epochs N`` uses
``SP2OTClustering(K, epochs=N)`` in fast mode instead (slower). One eigen-solve per set serves
every criterion; the seconds printed are the criterion's share after it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lt_sets import HELD_OUT, SETS, load_set  # noqa: E402


def clustering_acc(x, graph, y, k: int, fit_epochs: int, cache: dict) -> float:
    from sp2ot_engine.metrics import evaluate

    if k not in cache:
        if fit_epochs:
            from sp2ot_engine import SP2OTClustering

            labels = SP2OTClustering(k, epochs=fit_epochs, device="cpu", random_state=0).fit(x).labels_
        else:
            from sp2ot_engine.starts import spectral_partition

            labels = spectral_partition(graph, k, 0)
        cache[k] = 100.0 * float(evaluate(y, labels)["acc"])
    return cache[k]


def main() -> None:
    from sp2ot_engine.auto_k import K_CRITERIA, choose_k, default_k_range, spectral_eigenpairs
    from sp2ot_engine.graph import knn_graph

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="dev", help="dev, held-out, all, or a comma list of set names")
    ap.add_argument("--criteria", default=",".join(K_CRITERIA))
    ap.add_argument("--fit-epochs", type=int, default=0,
                    help="0: ACC of the spectral start; N: of SP2OTClustering trained N epochs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sets = {"dev": SETS, "held-out": HELD_OUT, "all": SETS + HELD_OUT}.get(args.sets) or tuple(args.sets.split(","))
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    what = f"SP2OTClustering, {args.fit_epochs} epochs" if args.fit_epochs else "spectral start"
    print(f"ACC of the {what}; chosen K in the default range; true K = the number of classes")
    print("| set | N | range | criterion | chosen K | true K | within 30 % | ACC chosen K | ACC true K | drop | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    misses = {c: 0 for c in args.criteria.split(",")}
    for name in sets:
        fset = load_set(name)
        x, y, true_k = fset.features, fset.labels, fset.n_classes
        graph = knn_graph(x, k=20, kernel="cosine")
        k_min, k_max = default_k_range(len(y))
        t = time.perf_counter()
        pairs = spectral_eigenpairs(graph, min(k_max + 1, len(y)), 0)
        t_eig = time.perf_counter() - t
        accs: dict[int, float] = {}
        for criterion in misses:
            t = time.perf_counter()
            choice = choose_k(graph, x, k_min, k_max, criterion=criterion, eigenpairs=pairs)
            secs = t_eig + time.perf_counter() - t
            ok = abs(choice.k - true_k) <= 0.3 * true_k
            acc_k = clustering_acc(x, graph, y, choice.k, args.fit_epochs, accs)
            acc_true = clustering_acc(x, graph, y, true_k, args.fit_epochs, accs)
            misses[criterion] += (not ok) or (acc_true - acc_k > 3.0)
            print(f"| {name} | {len(y)} | {k_min}-{k_max} | {criterion} | {choice.k} | {true_k} | "
                  f"{'yes' if ok else 'no'} | {acc_k:.1f} | {acc_true:.1f} | {acc_true - acc_k:+.1f} | {secs:.1f} |",
                  flush=True)
    print("sets missing a target (K within 30 %, ACC drop <= 3 points): "
          + ", ".join(f"{c} {m}" for c, m in misses.items()))


if __name__ == "__main__":
    main()
