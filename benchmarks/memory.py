"""Peak memory of fast-mode SP2OT on feature matrices: flat in N apart from the features and the graph?

    python benchmarks/memory.py                              # N = 5,000 / 20,000 / 80,000, d = 1280, K = 10
    python benchmarks/memory.py --sizes 2000,8000 --epochs 1 --inits random   # a quick look

Each fit runs in a fresh subprocess: it builds a synthetic long-tailed (imbalance 100) N x d
float32 feature matrix, imports everything, then resets its peak-RSS mark (Linux
``/proc/self/clear_refs``) and runs ``SP2OTClustering(K, mode="fast").fit(X)``. Reported per fit:
the peak RSS (``VmHWM``), the bytes of the features and of the kNN graph the fit built (its CSR
arrays: ``nnz`` values and column indices plus the row pointers), and the peak minus both. The
interpreter, torch and the other libraries are in every peak alike, so if nothing else grows with
N the "peak - X - S" column is flat: the ratio of its largest to its smallest value is printed.
The stage that set each peak (the mark is reset at every stage change) and what a dense N x N
float32 matrix would cost are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS


def synthetic_features(n: int, d: int, k: int, seed: int):
    """Long-tailed Gaussian mixture: class sizes fall geometrically from head to tail by 100x."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 100.0 ** (-np.arange(k) / max(k - 1, 1))
    labels = rng.choice(k, size=n, p=weights / weights.sum())
    centres = 3.0 * rng.standard_normal((k, d), dtype=np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32)
    for s in range(0, n, 8192):  # in place, no float64 temporaries
        x[s:s + 8192] += centres[labels[s:s + 8192]]
    return x


def child(args) -> None:
    """One fit in this (fresh) process; prints one JSON line."""
    import torch

    import sp2ot_engine.graph as graph_mod
    from sp2ot_engine import SP2OTClustering

    torch.set_num_threads(args.threads)
    # Warm-up on 600 rows: imports made inside fit (backbones, faiss, ...), thread pools and
    # allocator arenas are then in the starting RSS, as in any process that has run one fit.
    SP2OTClustering(args.k, mode="fast", epochs=1, init=args.init, device="cpu").fit(
        synthetic_features(600, args.d, args.k, args.seed + 1))
    x = synthetic_features(args.n, args.d, args.k, args.seed)
    graphs = []
    real_knn_graph = graph_mod.knn_graph

    def recording_knn_graph(*a, **kw):
        g = real_knn_graph(*a, **kw)
        graphs.append(g.data.nbytes + g.indices.nbytes + g.indptr.nbytes)
        return g

    graph_mod.knn_graph = recording_knn_graph  # fit imports it from the module at call time
    stages: dict[str, int] = {}
    current = ["start"]

    def close_stage() -> None:
        stages[current[0]] = max(stages.get(current[0], 0), _status_kib("VmHWM:") * 1024)
        _reset_peak()

    def progress(info: dict) -> None:
        if info["stage"] != current[0]:
            close_stage()
            current[0] = info["stage"]

    est = SP2OTClustering(args.k, mode="fast", epochs=args.epochs, init=args.init, knn=args.knn,
                          device="cpu", random_state=args.seed)
    _reset_peak()
    base = _status_kib("VmRSS:") * 1024
    t = time.perf_counter()
    est.fit(x, progress=progress)
    seconds = time.perf_counter() - t
    close_stage()
    print(json.dumps({"n": args.n, "init": args.init, "features": x.nbytes, "graph": graphs[0] if graphs else 0,
                      "base": base, "peak": max(stages.values()), "stages": stages, "seconds": seconds}))


def run_child(n: int, init: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--init", init, "--d", str(args.d), "--k", str(args.k),
           "--knn", str(args.knn), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child N={n} init={init} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,20000,80000", help="comma list of N")
    ap.add_argument("--inits", default="random,kmeans", help="comma list of cluster-head inits to measure")
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10, help="clusters")
    ap.add_argument("--knn", type=int, default=20, help="graph neighbours")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--init", default="random", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    print(f"fast mode, synthetic {args.d}-dim float32 features, K = {args.k}, kNN k = {args.knn}, "
          f"{args.epochs} epochs, {args.threads} threads; one fresh process per fit; MB = 2^20 bytes", flush=True)
    print()
    header = (f"{'init':>7} {'N':>7} {'X MB':>7} {'S MB':>6} {'peak MB':>8} {'peak-X-S':>9} "
              f"{'rss0-X':>7} {'peak stage':>11} {'fit s':>6}")
    print(header)
    print("-" * len(header), flush=True)
    results = []
    for init in inits:
        for n in sizes:
            r = run_child(n, init, args)
            r["rest"] = r["peak"] - r["features"] - r["graph"]
            stage = max(r["stages"], key=r["stages"].get)
            print(f"{init:>7} {n:>7,} {r['features'] / MB:7.1f} {r['graph'] / MB:6.1f} {r['peak'] / MB:8.1f} "
                  f"{r['rest'] / MB:9.1f} {(r['base'] - r['features']) / MB:7.1f} {stage:>11} "
                  f"{r['seconds']:6.1f}", flush=True)
            results.append(r)
    print()
    print("peak - X - S: peak RSS minus the features and the graph; rss0-X: RSS when the fit starts "
          "(interpreter, libraries) minus the features. Peak per stage, MB:")
    for r in results:
        print(f"  {r['init']:>7} N={r['n']:>6}: " + ", ".join(f"{s} {v / MB:.0f}" for s, v in r["stages"].items()))
    print()
    for init in inits:
        rest = [r["rest"] for r in results if r["init"] == init]
        print(f"{init}: largest / smallest 'peak - X - S' = {max(rest) / MB:.1f} / {min(rest) / MB:.1f} MB "
              f"= {max(rest) / min(rest):.3f} (N grows {max(sizes) / min(sizes):.0f}x)")
    print()
    print("a dense N x N float32 matrix would need: "
          + ", ".join(f"N = {n:,}: {n * n * 4 / MB:,.0f} MB" for n in sizes))


if __name__ == "__main__":
    main()
