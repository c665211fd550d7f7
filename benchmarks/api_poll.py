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
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_common import percentile, stack  # noqa: E402
from service_fixtures import image_set, make_zip  # noqa: E402

import httpx  # noqa: E402


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: much cheaper per request than a
    full client library, so that the load generator (on the same cores) disturbs the server less."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def poll(url: str, job_id: str, key_headers: dict, n: int, interval: float, duration: float):
    parsed = httpx.URL(url)
    latencies: list[float] = []
    errors = 0
    statuses: dict[str, int] = {}
    stop_at = time.perf_counter() + duration

    async def poller(i: int):
        nonlocal errors
        conn = RawConnection(parsed.host, parsed.port, key_headers)
        await asyncio.sleep(interval * i / n if interval else 0)  # spread the pollers evenly
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.get(f"/jobs/{job_id}"), 10)
                    dt = time.perf_counter() - t0
                    if status == 200:
                        latencies.append(dt)
                        st = json.loads(body)["status"]
                        statuses[st] = statuses.get(st, 0) + 1
                    else:
                        errors += 1
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    dt = time.perf_counter() - t0
                    conn.close()
                    conn = RawConnection(parsed.host, parsed.port, key_headers)
                if interval:
                    await asyncio.sleep(max(0.0, interval - dt))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(poller(i) for i in range(n)))
    return latencies, errors, statuses, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        cpu0 = cpu_seconds(server.proc.pid)
        lat, errors, statuses, elapsed = asyncio.run(
            poll(server.url, job_id, {}, args.pollers, args.interval, args.duration))
        server_cpu = cpu_seconds(server.proc.pid) - cpu0
        job = c.get(f"/jobs/{job_id}").json()
        c.post(f"/jobs/{job_id}/cancel")
        c.close()
    ms = [x * 1000 for x in lat]
    p99 = percentile(ms, 99)
    print(f"requests {len(ms)} ({len(ms) / elapsed:.0f}/s), errors {errors}, job statuses seen {statuses}")
    print(f"latency ms: p50 {percentile(ms, 50):.2f}  p95 {percentile(ms, 95):.2f}  p99 {p99:.2f}  "
          f"max {max(ms):.2f}  mean {statistics.fmean(ms):.2f}")
    print(f"API process CPU: {server_cpu / max(len(ms), 1) * 1000:.2f} ms per request "
          f"({100 * server_cpu / elapsed:.0f}% of a core); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"job progress at the end: {job['progress']}")
    print(f"p99 {'<' if p99 < 20 else '>='} 20 ms target: {'OK' if p99 < 20 else 'MISSED'}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
