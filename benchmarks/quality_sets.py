"""The clustering-quality research loop: every variant on every long-tailed benchmark set.

    python benchmarks/quality_sets.py                                   # default variants, 5 seeds, dev sets
    python benchmarks/quality_sets.py --variants kmeans,default --sets all --seeds 0 1 2 3 4
    python benchmarks/quality_sets.py --list                            # the variants and the sets

Each variant is a row of the table in ``benchmarks/README.md``: a baseline on the features
(k-means, spectral, the raw graph starts) or an ``SP2OTClustering`` configuration in fast mode
(the estimator given the cached backbone features). Sets are those of ``lt_sets.py``
(``--sets dev`` the four the defaults were chosen on, ``held-out`` the two kept aside, ``all``).

Prints, per set and variant, the mean and standard deviation over the seeds of ACC and the mean
NMI / F1 / Head / Medium / Tail (percent, :func:`sp2ot_engine.metrics.evaluate`) and fit seconds;
``--json FILE`` keeps every seed's metrics, ``--markdown FILE`` the table.
``--table FILE`` prints the table of a JSON-lines file without running anything: per set and
variant, the rows of the newest commit that ran it (the README's table is made this way from
``results/quality_sets.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lt_sets import HELD_OUT, SETS, load_set  # noqa: E402

METRICS = ("acc", "nmi", "f1", "head_acc", "medium_acc", "tail_acc")


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """faiss k-means on the raw features (50 iterations, 5 restarts): the reference row."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=50, nredo=5, seed=seed)
    km.train(x)
    return km.index.search(x, 1)[1].ravel()


def spectral_sklearn(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn's spectral clustering on its own 20-NN connectivity graph (the earlier row)."""
    from sklearn.cluster import SpectralClustering

    return SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=20, assign_labels="cluster_qr",
                              random_state=seed, n_jobs=1).fit_predict(x)


def graph_start(kind: str) -> Callable[[np.ndarray, int, int], np.ndarray]:
    """A start of :mod:`sp2ot_engine.starts` on the cosine 20-NN graph, without any training."""
    def run(x: np.ndarray, k: int, seed: int) -> np.ndarray:
        from sp2ot_engine.graph import knn_graph
        from sp2ot_engine.starts import density_modes, spectral_partition

        graph = knn_graph(x, k=20, kernel="cosine")
        return density_modes(graph, k) if kind == "density" else spectral_partition(graph, k, seed)
    return run


def estimator(**params) -> Callable[[np.ndarray, int, int], np.ndarray]:
    """``SP2OTClustering(k, random_state=seed, device="cpu", **params)`` fitted on the features."""
    def run(x: np.ndarray, k: int, seed: int) -> np.ndarray:
        from sp2ot_engine import SP2OTClustering

        est = SP2OTClustering(k, random_state=seed, device="cpu", **params).fit(x)
        run.last = {"start": est.start_, "start_scores": est.start_scores_}  # which start won, and by how much
        return est.labels_
    run.params = params  # type: ignore[attr-defined]
    return run


VARIANTS: dict[str, Callable] = {
    "kmeans": kmeans,
    "spectral": spectral_sklearn,
    "density-start": graph_start("density"),
    "spectral-start": graph_start("spectral"),
    # the paper's pipeline: random prototypes (the Table IV rows), 10 epochs as in the earlier runs
    "paper-ot": estimator(init="random", formulation="ot", epochs=10),
    "paper-uot": estimator(init="random", formulation="uot", epochs=10),
    "paper-pot": estimator(init="random", formulation="pot", epochs=10),
    "paper-p2ot": estimator(init="random", formulation="p2ot", epochs=10),
    "paper-sp2ot": estimator(init="random", formulation="sp2ot", epochs=10),
    "kmeans-start-sp2ot": estimator(init="kmeans", formulation="sp2ot", epochs=10),
    # graph starts refined by the transport training
    "density-p2ot": estimator(init="density", formulation="p2ot", epochs=10),
    "density-sp2ot": estimator(init="density", formulation="sp2ot", epochs=10),
    "spectral-p2ot": estimator(init="spectral", formulation="p2ot", epochs=10),
    "spectral-sp2ot": estimator(init="spectral", formulation="sp2ot", epochs=10),
    "graph-p2ot": estimator(init="auto", formulation="p2ot", epochs=10),
    "graph-sp2ot": estimator(init="auto", formulation="sp2ot", epochs=10),
    "graph-sp2ot-cosine": estimator(init="auto", formulation="sp2ot", epochs=10, kernel="cosine"),
    "graph-sp2ot-30ep": estimator(init="auto", formulation="sp2ot", epochs=30),
    "graph-p2ot-30ep": estimator(init="auto", formulation="p2ot", epochs=30),
    # the formulation ablations under the default start
    "graph-ot": estimator(init="auto", formulation="ot", epochs=10),
    "graph-uot": estimator(init="auto", formulation="uot", epochs=10),
    "graph-pot": estimator(init="auto", formulation="pot", epochs=10),
    # whatever the estimator does without arguments
    "default": estimator(),
}
DEFAULT_VARIANTS = ("kmeans", "spectral", "density-start", "spectral-start", "paper-sp2ot", "density-sp2ot",
                    "spectral-sp2ot", "graph-p2ot", "graph-sp2ot", "default")


def run_variant(name: str, fset, seeds: list[int]) -> list[dict]:
    from sp2ot_engine.metrics import evaluate

    rows = []
    for seed in seeds:
        t = time.perf_counter()
        labels = VARIANTS[name](fset.features, fset.n_classes, seed)
        secs = time.perf_counter() - t
        m = {k: float(v) for k, v in evaluate(fset.labels, labels).items()}
        rows.append({"seed": seed, "seconds": secs, **m, **getattr(VARIANTS[name], "last", {})})
    return rows


def summary_line(set_name: str, name: str, rows: list[dict]) -> str:
    acc = [100 * r["acc"] for r in rows]
    means = {m: 100 * np.mean([r[m] for r in rows]) for m in METRICS[1:]}
    return (f"| {set_name} | {name} | {len(rows)} | {np.mean(acc):.1f} ± {np.std(acc):.1f} | "
            + " | ".join(f"{means[m]:.1f}" for m in METRICS[1:]) + f" | {np.mean([r['seconds'] for r in rows]):.1f} |")


TABLE_HEAD = ["| set | variant | seeds | ACC (mean ± std) | NMI | F1 | Head | Medium | Tail | fit s |",
              "|---|---|---|---|---|---|---|---|---|---|"]


def table_of(path: Path) -> str:
    """The markdown table of a ``--json`` file: per (set, variant), in the file's order, the rows
    of the last commit that wrote any (rows without a commit count as one older run)."""
    groups: dict[tuple[str, str], dict[str | None, list[dict]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            groups.setdefault((r["set"], r["variant"]), {}).setdefault(r.get("commit"), []).append(r)
    lines = list(TABLE_HEAD)
    order = {name: i for i, name in enumerate(SETS + HELD_OUT)}
    for (set_name, name), by_commit in sorted(groups.items(), key=lambda kv: order.get(kv[0][0], 99)):
        rows = list(by_commit.values())[-1]
        lines.append(summary_line(set_name, name, rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--sets", default="dev", help="dev, held-out, all, or a comma list of set names")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append every seed's metrics to this JSON-lines file")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", type=Path, help="print the table of this JSON-lines file and exit")
    args = ap.parse_args()
    if args.table:
        print(table_of(args.table))
        return
    if args.list:
        print("variants:", ", ".join(VARIANTS))
        print("sets: dev =", ", ".join(SETS), "| held-out =", ", ".join(HELD_OUT))
        return
    sets = {"dev": SETS, "held-out": HELD_OUT, "all": SETS + HELD_OUT}.get(args.sets) or tuple(args.sets.split(","))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; --list shows them")
    import faiss
    import torch

    # which code produced a row: the study reruns variants as the engine changes
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    lines = list(TABLE_HEAD)
    print("\n".join(lines), flush=True)
    for set_name in sets:
        fset = load_set(set_name)
        for name in variants:
            rows = run_variant(name, fset, args.seeds)
            line = summary_line(set_name, name, rows)
            lines.append(line)
            print(line, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    for r in rows:
                        f.write(json.dumps({"set": set_name, "variant": name, "commit": commit, **r}) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
