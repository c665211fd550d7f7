"""Solver benchmark: the project's P2OT / SP2OT against the research code's loops, in one run.

    python benchmarks/solver.py            # full table (N = 5,120 with K = 100 and 1,000; N = 50,000 with K = 1,000)
    python benchmarks/solver.py --quick    # N = 5,120, K = 100 only

For each case it times both solvers on the same cost (median of ``--repeat`` runs, 2 threads
unless ``--threads``), checks that the plans agree (L1 distance), and prints the speed-up and
the peak memory each needs (peak RSS growth of a fresh subprocess running only that solve).
Costs are ``-log softmax(10 * cos(f, w))`` of clustered synthetic features and random
prototypes, as produced by the cosine head during training.

SP2OT uses a k = 20 Gaussian kNN graph of the features: sparse for the project, the dense
``N x N`` matrix for the research loop (which also restarts its scaling each MM step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import reference_p2ot, reference_sp2ot  # noqa: E402


def make_cost(n: int, k: int, seed: int = 0, dim: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """Cosine-head costs for clustered features; also returns the features (for the kNN graph)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    sizes = torch.linspace(1.0, 0.01, k)  # long-tailed cluster sizes
    labels = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=g)
    feats = centres[labels] + 1.5 * torch.randn(n, dim, generator=g)
    protos = centres + 0.8 * torch.randn(k, dim, generator=g)
    logits = 10 * torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(protos, dim=1).T
    return -torch.log_softmax(logits.double(), dim=1), feats.numpy()


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_memory_mb(case: dict) -> float:
    """Peak RSS growth (MB) of one solve: a subprocess builds the inputs, resets its peak-RSS
    mark (Linux ``clear_refs``) and reports how far the solve raised it."""
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import torch
torch.set_num_threads({case['threads']})
from solver import make_cost, run_one
cost, feats = make_cost({case['n']}, {case['k']})
graph = None
if {case['kind']!r} == 'sp2ot':
    from sp2ot_engine.graph import knn_graph
    graph = knn_graph(feats, k=20, device='cpu')
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1])
before = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
run_one({case['kind']!r}, {case['who']!r}, cost, graph, {case['rho']})
print(json.dumps((status('VmHWM:') - before) / 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def lam_s_for(rho: float, n: int) -> float:
    from sp2ot_engine.ot import semantic_strength

    return semantic_strength(rho, 1000.0, n=n)


def run_one(kind: str, who: str, cost: torch.Tensor, graph, rho: float):
    from sp2ot_engine.ot import solve_p2ot, solve_sp2ot

    if kind == "p2ot":
        if who == "ours":
            return solve_p2ot(cost, rho)
        return reference_p2ot(cost, rho)[0]
    lam_s = lam_s_for(rho, cost.shape[0])
    if who == "ours":
        return solve_sp2ot(cost, graph, rho, lam_s=lam_s)
    return reference_sp2ot(cost, torch.from_numpy(graph.toarray()), rho, lam_s)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only N = 5,120, K = 100")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sp2ot_engine.graph import knn_graph
    from sp2ot_engine.ot import solve_p2ot, solve_sp2ot, sp2ot_objective

    cases = [("p2ot", 5120, 100, rho) for rho in (0.1, 0.5, 0.9)]
    cases += [("sp2ot", 5120, 100, rho) for rho in (0.1, 0.5, 0.9)]
    if not args.quick:
        cases += [("p2ot", 5120, 1000, rho) for rho in (0.1, 0.5, 0.9)]
        cases += [("p2ot", 50000, 1000, 0.5)]
    rows = []
    print(f"threads={torch.get_num_threads()}  (times: median of {args.repeat}; L1 = |Q_ours - Q_ref|_1)")
    header = f"{'solver':6} {'N':>6} {'K':>5} {'rho':>4} | {'ours s':>8} {'ref s':>8} {'speed-up':>8} | {'L1':>8} | {'extra':>28} | {'mem MB ours/ref':>16}"
    print(header)
    print("-" * len(header))
    for kind, n, k, rho in cases:
        cost, feats = make_cost(n, k)
        graph = knn_graph(feats, k=20, device="cpu") if kind == "sp2ot" else None
        repeat = args.repeat if n * k <= 5120 * 1000 else 1
        ref_repeat = repeat if kind == "p2ot" else 1
        if kind == "p2ot":
            t_ours, (q, info) = timed(lambda: solve_p2ot(cost, rho, return_info=True), repeat)
            t_ref, (q_ref, iters) = timed(lambda: reference_p2ot(cost, rho), ref_repeat)
            extra = f"newton {info.n_iter}, scaling {iters}"
        else:
            lam_s = lam_s_for(rho, n)
            t_ours, (q, info) = timed(lambda: solve_sp2ot(cost, graph, rho, lam_s=lam_s, return_info=True), repeat)
            dense = torch.from_numpy(graph.toarray())
            t_ref, (q_ref, steps, iters) = timed(lambda: reference_sp2ot(cost, dense, rho, lam_s), ref_repeat)
            del dense
            f_ours = sp2ot_objective(cost, q, graph, rho, lam_s=lam_s)
            f_ref = sp2ot_objective(cost, q_ref, graph, rho, lam_s=lam_s)
            extra = f"MM {info.n_iter}/{steps}, F {f_ours - f_ref:+.1e}"
        l1 = float((q - q_ref).abs().sum())
        mem = ""
        if not args.no_memory:
            base = {"kind": kind, "n": n, "k": k, "rho": rho, "threads": args.threads}
            mem_ours = peak_memory_mb(base | {"who": "ours"})
            mem_ref = peak_memory_mb(base | {"who": "ref"})
            mem = f"{mem_ours:7.0f}/{mem_ref:<7.0f}"
        row = {"solver": kind, "n": n, "k": k, "rho": rho, "ours_s": t_ours, "ref_s": t_ref,
               "speedup": t_ref / t_ours, "l1": l1, "extra": extra, "mem": mem}
        rows.append(row)
        print(f"{kind:6} {n:>6} {k:>5} {rho:>4} | {t_ours:8.3f} {t_ref:8.3f} {t_ref / t_ours:7.1f}x | {l1:8.1e} | "
              f"{extra:>28} | {mem:>16}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
