"""/health: database, broker and workers."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


def _check(request: Request) -> HealthOut:
    db = request.app.state.db
    queue = request.app.state.job_queue
    t0 = time.perf_counter()
    try:
        db.ping()
        database = {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                    "detail": db.engine.dialect.name}
    except Exception as e:
        database = {"ok": False, "detail": f"database unreachable: {type(e).__name__}"}
    b_ok, b_detail, b_ms = queue.broker()
    broker = {"ok": b_ok, "detail": b_detail, "latency_ms": None if b_ms is None else round(b_ms, 2)}
    if b_ok:
        w_ok, count, names, w_detail = queue.workers()
    else:
        w_ok, count, names, w_detail = False, 0, [], "broker unreachable"
    workers = {"ok": w_ok, "mode": queue.mode, "count": count, "names": names, "detail": w_detail}
    status = "down" if not database["ok"] else ("ok" if b_ok and w_ok else "degraded")
    return HealthOut(status=status, version=__version__, database=database, broker=broker, workers=workers)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(request: Request):
    """`ok`: everything answers; `degraded`: the API and database work but no worker (or
    broker) answers, so jobs wait in the queue; `down` (503): the database is unreachable.
    Workers are pinged with a 0.5 s timeout (Celery), or reported as `in-process`."""
    out = await run_in_threadpool(_check, request)
    return JSONResponse(out.model_dump(mode="json"), status_code=503 if out.status == "down" else 200)


@router.get("/health/live")
async def live():
    """Liveness only (no dependency checked): for container health checks."""
    return {"status": "ok"}
