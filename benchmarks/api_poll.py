"""Latency of ``GET /jobs/{id}`` with many concurrent pollers while a job trains.

Starts a server on 127.0.0.1 (Celery mode: PostgreSQL + Redis + one worker process, or the
embedded mode), creates a job long enough to train during the whole measurement, then runs
N pollers (default 100), each requesting ``GET /jobs/{id}`` every ``--interval`` seconds
(a client polling once a second; 0 = back-to-back, a stress test), for ``--duration``
seconds. Prints p50/p95/p99/max latency and the request rate. Target: p99 < 20 ms.

    python benchmarks/api_poll.py                        # 100 pollers, 1 s interval, 20 s
    python benchmarks/api_poll.py --mode embedded --interval 0.5
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import percentile, stack  # noqa: E402
from service_fixtures import image_set, make_zip  # noqa: E402

import httpx  # noqa: E402


async def poll(url: str, job_id: str, key_headers: dict, n: int, interval: float, duration: float):
    latencies: list[float] = []
    errors = 0
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10, headers=key_headers) as client:
        stop_at = time.perf_counter() + duration

        async def poller(i: int):
            nonlocal errors
            await asyncio.sleep(interval * i / n if interval else 0)  # spread the pollers evenly
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await client.get(f"/jobs/{job_id}")
                    dt = time.perf_counter() - t0
                    if r.status_code == 200:
                        latencies.append(dt)
                        st = r.json()["status"]
                        statuses[st] = statuses.get(st, 0) + 1
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                    dt = time.perf_counter() - t0
                if interval:
                    await asyncio.sleep(max(0.0, interval - dt))

        t0 = time.perf_counter()
        await asyncio.gather(*(poller(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    return latencies, errors, statuses, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["celery", "embedded"], default="celery")
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between two polls of one poller (0 = none)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--engine", choices=["real", "fake"], default="real",
                    help="fake = the tests' stand-in estimator (if the real engine is not installed)")
    args = ap.parse_args()
    args.duration = min(args.duration, 120.0)  # bounded
    estimator = "sp2ot_engine:SP2OTClustering" if args.engine == "real" else "service_fixtures:FakeClustering"
    extra = {"SP2OT_FAKE_STEP_DELAY": "0.05"} if args.engine == "fake" else {}
    with stack(args.mode, estimator, **extra) as (server, env, workdir):
        c = httpx.Client(base_url=server.url, timeout=60)
        r = c.post("/jobs", files={"archive": ("shapes.zip", make_zip(image_set(60)))},
                   data={"n_clusters": "3", "mode": "fast", "epochs": "1000"})
        r.raise_for_status()
        job_id = r.json()["id"]
        deadline = time.time() + 120
        while time.time() < deadline:
            job = c.get(f"/jobs/{job_id}").json()
            if job["progress"].get("stage") == "training":
                break
            if job["status"] in ("failed", "succeeded", "cancelled"):
                raise SystemExit(f"job ended before the measurement: {job}")
            time.sleep(0.5)
        else:
            raise SystemExit("job did not reach the training stage")
        print(f"server {server.url} ({args.mode}), job {job_id} training; "
              f"{args.pollers} pollers, interval {args.interval}s, {args.duration:.0f}s")
        lat, errors, statuses, elapsed = asyncio.run(
            poll(server.url, job_id, {}, args.pollers, args.interval, args.duration))
        job = c.get(f"/jobs/{job_id}").json()
        c.post(f"/jobs/{job_id}/cancel")
        c.close()
    ms = [x * 1000 for x in lat]
    p99 = percentile(ms, 99)
    print(f"requests {len(ms)} ({len(ms) / elapsed:.0f}/s), errors {errors}, job statuses seen {statuses}")
    print(f"latency ms: p50 {percentile(ms, 50):.2f}  p95 {percentile(ms, 95):.2f}  p99 {p99:.2f}  "
          f"max {max(ms):.2f}  mean {statistics.fmean(ms):.2f}")
    print(f"job progress at the end: {job['progress']}")
    print(f"p99 {'<' if p99 < 20 else '>='} 20 ms target: {'OK' if p99 < 20 else 'MISSED'}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
