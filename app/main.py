"""The FastAPI application: ``create_app(settings)``.

Run it with ``sp2ot serve`` (or ``uvicorn --factory app.main:create_app``). At start-up it
applies the database migrations, creates the data dir, removes the upload folders of processes
that died, in the embedded mode (no broker) resumes the jobs a previous run left unfinished,
and starts the reaper (``app.jobs.reaper``: jobs whose worker is gone, retention).
"""
from __future__ import annotations

import logging
from urllib.parse import quote
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import __version__
from app.api.deps import _KeyCache
from app.api.middleware import RequestContext
from app.api.openapi import contract
from app.api.routes import assign, curation, datasets, exports, health, jobs
from app.core.config import Settings, is_loopback_host
from app.core.db import Database, run_migrations
from app.core.fastread import make_read_pool
from app.errors import ApiError
from app.jobs.queue import make_queue
from app.jobs.reaper import Reaper
from app.storage import Storage
from app.ui import pages

log = logging.getLogger("sp2ot.api")


class InsecureConfiguration(RuntimeError):
    pass


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without authentication on anything but a loopback address."""
    if not settings.auth_required and not is_loopback_host(settings.host):
        raise InsecureConfiguration(
            f"Refusing to listen on {settings.host} without authentication. Either listen on 127.0.0.1 "
            "(the default) or set SP2OT_AUTH_REQUIRED=true and create API keys with `sp2ot create-api-key NAME`."
        )


def _error_messages(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(pages.LoginRequired)
    async def _login(request: Request, exc: pages.LoginRequired):
        return RedirectResponse(f"/ui/login?next={quote(exc.next_url, safe='')}", status_code=303)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if pages.is_page(request):
            return pages.error_page(request, exc.status_code, exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No such endpoint: {request.method} {request.url.path}. See /docs for the API."
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # The router names the methods of the first route on the path; a path has one route per method.
            allow = ", ".join(m for m in allowed_methods(app, request.scope))
            headers = {**(headers or {}), "Allow": allow}
            detail = (f"Method {request.method} is not allowed on {request.url.path} (allowed: {allow}). "
                      "See /docs for the API.")
        if pages.is_page(request):
            return pages.error_page(request, exc.status_code, detail.replace(" See /docs for the API.", ""))
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        if pages.is_page(request):
            return pages.error_page(request, 422, _error_messages(exc))
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in exc.errors()]
        return JSONResponse({"detail": _error_messages(exc), "errors": errors}, status_code=422)


async def unexpected_error(request: Request, request_id: str) -> Response:
    """The answer to an exception no handler knew (see :mod:`app.api.middleware`)."""
    if pages.is_page(request):
        return pages.error_page(request, 500, f"Something went wrong on the server (request {request_id}). "
                                              "The error was logged; please report it.")
    return JSONResponse(
        {"detail": f"Internal server error (request {request_id}). The error was logged; please report it "
                   "with this request id.", "request_id": request_id},
        status_code=500,
    )


HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route of ``app`` fully matches on the path of ``scope`` (for ``Allow``;
    asked through the routes' own matching, which sees into included routers)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_exposure(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        storage = Storage(settings)
        storage.ensure()
        removed = storage.clean_stale_tmp()
        if removed:
            log.info("removed %d upload folder(s) left by processes that died", removed)
        app.state.upload_area = storage.open_upload_area()
        if settings.run_migrations:
            await run_in_threadpool(run_migrations, settings)
        db = Database(settings)
        app.state.db = db
        app.state.read_pool = make_read_pool(settings)
        app.state.storage = storage
        app.state.job_queue = make_queue(settings, db)
        # The archive checks' image-header readers: load them now rather than during the first upload.
        await run_in_threadpool(_warm_up)
        await run_in_threadpool(app.state.job_queue.recover, db)
        app.state.reaper = Reaper(settings, db, storage, app.state.job_queue).start()
        log.info("sp2ot API ready (database %s, workers %s, data dir %s)",
                 db.engine.dialect.name, app.state.job_queue.mode, settings.data_dir)
        try:
            yield
        finally:
            await run_in_threadpool(app.state.reaper.stop)
            app.state.job_queue.shutdown()
            if app.state.read_pool is not None:
                await app.state.read_pool.close()
            db.dispose()
            app.state.upload_area.close()
            storage.open_uploads.close()

    app = FastAPI(
        title="sp2ot",
        version=__version__,
        description=(
            "Image clustering with SP2OT (imbalanced / long-tailed data). Upload an archive of images to "
            "`POST /jobs`, poll `GET /jobs/{id}`, download `GET /jobs/{id}/labels.csv`. Authenticate with "
            "`Authorization: Bearer <API key>` (keys are created with `sp2ot create-api-key NAME`). "
            'Every error is JSON: `{"detail": "what went wrong and how to fix it"}`.'
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.key_cache = _KeyCache()
    install_error_handlers(app)
    app.add_middleware(RequestContext, answer=unexpected_error)
    app.openapi = lambda: contract(app)
    app.include_router(jobs.router)
    app.include_router(assign.router)
    app.include_router(datasets.router)
    app.include_router(health.router)
    app.include_router(exports.router)
    app.include_router(curation.router)
    app.include_router(pages.router)
    app.mount("/ui/static", StaticFiles(directory=str(pages.STATIC_DIR)), name="static")
    return app


def _warm_up() -> None:
    try:
        from PIL import Image

        import sp2ot_engine.io.archive  # noqa: F401

        Image.init()  # every Pillow format plugin (the header readers)
    except Exception:  # pragma: no cover - reported on first use
        log.warning("cannot load the archive checks", exc_info=True)


def __getattr__(name: str):
    # `uvicorn app.main:app` works too (settings from the environment).
    if name == "app":
        return create_app()
    raise AttributeError(name)
