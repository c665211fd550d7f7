"""/health: database, broker, workers, and running jobs without a live worker."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.jobs import repository
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


def _check(request: Request) -> HealthOut:
    db = request.app.state.db
    queue = request.app.state.job_queue
    settings = request.app.state.settings
    t0 = time.perf_counter()
    try:
        db.ping()
        database = {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                    "detail": db.engine.dialect.name}
        with db.read_session() as s:
            n, ids = repository.count_abandoned(s, settings.heartbeat_timeout)
        jobs = {"ok": n == 0, "without_worker": n, "without_worker_ids": ids,
                "detail": f"{n} running job(s) without a live worker; the reaper re-queues or ends them" if n else None}
    except Exception as e:
        database = {"ok": False, "detail": f"database unreachable: {type(e).__name__}"}
        jobs = {"ok": False, "without_worker": 0, "detail": "database unreachable"}
    b_ok, b_detail, b_ms = queue.broker()
    broker = {"ok": b_ok, "detail": b_detail, "latency_ms": None if b_ms is None else round(b_ms, 2)}
    if b_ok:
        w_ok, count, names, w_detail = queue.workers()
    else:
        w_ok, count, names, w_detail = False, 0, [], "broker unreachable"
    workers = {"ok": w_ok, "mode": queue.mode, "count": count, "names": names, "detail": w_detail}
    status = "down" if not database["ok"] else ("ok" if b_ok and w_ok and jobs["ok"] else "degraded")
    return HealthOut(status=status, version=__version__, database=database, broker=broker, workers=workers,
                     jobs=jobs)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(request: Request):
    """`ok`: everything answers; `degraded`: the API and database work but no worker (or
    broker) answers, so jobs wait in the queue, or running jobs have lost their worker
    (`jobs.without_worker`, their ids in `jobs.without_worker_ids`); `down` (503): the
    database is unreachable. Workers are pinged with a 0.5 s timeout (Celery), or reported as
    `in-process`."""
    out = await run_in_threadpool(_check, request)
    return JSONResponse(out.model_dump(mode="json"), status_code=503 if out.status == "down" else 200)


@router.get("/health/live")
async def live():
    """Liveness only (no dependency checked): for container health checks."""
    return {"status": "ok"}
