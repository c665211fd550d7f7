"""Time ``sp2ot_engine.graph.knn_graph`` on random features and report peak memory.

Usage::

    python benchmarks/knn_graph.py [--n 60000 --d 1280 --k 20 --kernel gaussian]

Prints the wall-clock seconds of the graph build, the CPU seconds it used (user + system,
all threads: the load-independent measure of work), the 1-minute load average before and
after (other processes on a shared machine slow the wall clock down), and the process' peak
resident set size (``ru_maxrss``) in MB before and after the build (the features alone are
``N * d * 4`` bytes). Target on a 2-core CPU: < 90 s and < 2 GB peak for 60,000 x 1,280,
k = 20.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sp2ot_engine.graph import DEFAULT_BATCH_SIZE, knn_graph  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000, help="number of points")
    ap.add_argument("--d", type=int, default=1_280, help="feature dimension")
    ap.add_argument("--k", type=int, default=20, help="neighbours per point")
    ap.add_argument("--kernel", choices=("gaussian", "cosine"), default="gaussian")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS and faiss OpenMP threads (default: the libraries' defaults, "
                         "i.e. all cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import contextlib

    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    limits = contextlib.nullcontext()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        limits = threadpool_limits(limits=args.threads, user_api="blas")
    features = np.random.default_rng(args.seed).standard_normal(
        (args.n, args.d), dtype=np.float32)
    before = peak_rss_mb()
    load0 = os.getloadavg()[0]
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    with limits:
        blas_threads = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        graph = knn_graph(features, k=args.k, kernel=args.kernel, device="cpu",
                          batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    after = peak_rss_mb()
    print(f"knn_graph n={args.n} d={args.d} k={args.k} kernel={args.kernel} "
          f"faiss_threads={faiss.omp_get_max_threads()} blas_threads={blas_threads} "
          f"batch_size={args.batch_size}")
    print(f"nnz={graph.nnz} shape={graph.shape} dtype={graph.dtype}")
    print(f"seconds: {seconds:.2f}")
    print(f"cpu seconds (user+sys, all threads): {cpu:.2f}")
    print(f"load average (1 min) before/after: {load0:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"peak RSS MB: {after:.0f} (before build: {before:.0f}; features "
          f"{features.nbytes / 2**20:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
