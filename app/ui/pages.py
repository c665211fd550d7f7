"""The web pages: server-rendered Jinja2 templates (``templates/``) and one script and one style
sheet (``static/``), nothing fetched from elsewhere. They read through the same owner checks as
the API (another key's job is a 404 page) and change things through the API's endpoints
(``/jobs``, ``/jobs/{id}/curation/...``) with the page's CSRF token.

Every list is paginated and every page's queries go through an index (``app.results``); images
are shown as the thumbnails the worker made (``app.jobs.artifacts``), never by decoding an original.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import mimetypes
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from app import __version__, crud, curation, results
from app.api.deps import (
    CSRF_FIELD,
    SESSION_COOKIE,
    OwnerDep,
    ReadSessionDep,
    StorageDep,
    Unauthorized,
    check_csrf,
    current_owner,
    session_csrf_token,
)
from app.core.security import Owner
from app.errors import ApiError, NotFound
from app.jobs import artifacts, repository
from app.jobs.repository import JobRecord
from app.models import JobStatus
from app.schemas import MAX_INDEX, MAX_PAGE_NUMBER

HERE = Path(__file__).resolve().parent
# Bounded path numbers: past them a 422, never an overflow in the database.
ImageIndex = Annotated[int, PathParam(ge=0, le=MAX_INDEX)]
ClusterNumber = Annotated[int, PathParam(ge=0, le=MAX_INDEX)]
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

CARDS_PER_PAGE = 24
IMAGES_PER_PAGE = 60
JOBS_PER_PAGE = 15
DATASETS_PER_PAGE = 10
TOP_PER_CARD = 8
LEAST_PER_CARD = 5
THUMB_CACHE = "private, max-age=31536000, immutable"  # a job's thumbnails never change
# The original's media type, from its type by magic bytes (the manifest's), not its name.
ORIGINAL_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
                  "tiff": "image/tiff", "webp": "image/webp", "avif": "image/avif", "heif": "image/heif",
                  "ico": "image/x-icon"}
PLACEHOLDER = (b'<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128"><rect width="128" height="128" '
               b'fill="#e5e7eb"/><text x="64" y="70" font-size="14" text-anchor="middle" fill="#6b7280">'
               b'no preview</text></svg>')


class LoginRequired(Exception):
    def __init__(self, next_url: str):
        self.next_url = next_url


def is_page(request: Request) -> bool:
    """Requests whose errors are answered with an HTML page rather than JSON."""
    path = request.url.path
    return path == "/" or (path.startswith("/ui/") and not path.endswith((".json", ".bin")))


def _static_version() -> str:
    h = hashlib.sha256(__version__.encode())
    for p in sorted(STATIC_DIR.iterdir()):
        h.update(p.name.encode() + str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()[:10]


STATIC_VERSION = _static_version()


def _fmt_time(dt: datetime | None) -> str:
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters["when"] = _fmt_time
templates.env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.1f}%"
templates.env.filters["urlq"] = lambda v: quote(str(v), safe="")


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    context.setdefault("owner", None)
    return templates.TemplateResponse(request, name, {
        "csrf": session_csrf_token(request), "csrf_field": CSRF_FIELD, "auth_required": settings.auth_required,
        "logged_in": bool(request.cookies.get(SESSION_COOKIE)), "static_version": STATIC_VERSION,
        "version": __version__, **context}, status_code=status_code)


def error_page(request: Request, status_code: int, detail: str) -> HTMLResponse:
    titles = {401: "Not signed in", 403: "Not allowed", 404: "Not found", 409: "Not available yet",
              422: "Cannot do that"}
    return render(request, "error.html", status_code=status_code, title=titles.get(status_code, "Error"),
                  detail=detail)


async def page_owner(request: Request) -> Owner:
    """The owner, as for the API; without a valid key (authentication on): the login page."""
    try:
        return await current_owner(request)
    except Unauthorized:
        if request.app.state.settings.auth_required:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(target) from None
        raise


PageOwner = Annotated[Owner, Depends(page_owner)]


def _job_or_404(session, owner: Owner, job_id: str) -> JobRecord:
    job = repository.get_job(session, owner, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id} for you. It may have been deleted, or it belongs to another key.")
    return job


def _succeeded_or_409(job: JobRecord) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise ApiError(f"Job {job.id} is {job.status}: its images can be browsed once it has succeeded.", 409)


def _pages(total: int, per_page: int, page: int) -> dict[str, int]:
    pages = max(1, math.ceil(total / per_page))
    page = min(max(1, page), pages)
    return {"page": page, "pages": pages, "offset": (page - 1) * per_page, "total": total}


def _clusters(session, job: JobRecord, info: results.CurationInfo | None = None) -> list[results.Cluster]:
    info = info or results.curation_info(session, job.id)
    return results.clusters(session, job.id, job.n_clusters, (job.summary or {}).get("cluster_sizes"), info.curated)


def _engine_choices() -> dict[str, tuple[str, ...]]:
    from sp2ot_engine import options

    return {"mode": options.MODES, "backbone": options.BACKBONES, "formulation": options.FORMULATIONS,
            "init": options.INITS}


# ----------------------------------------------------------------------------- home, login
@router.get("/", response_class=HTMLResponse)
def home(request: Request, owner: PageOwner, session: ReadSessionDep, page: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1,
         dpage: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1):
    """The upload form, the recent jobs and the stored datasets."""
    jobs, total = repository.list_jobs(session, owner, JOBS_PER_PAGE, (page - 1) * JOBS_PER_PAGE)
    datasets, dtotal = crud.list_datasets(session, owner, DATASETS_PER_PAGE, (dpage - 1) * DATASETS_PER_PAGE)
    settings = request.app.state.settings
    return render(request, "home.html", owner=owner, jobs=jobs, datasets=datasets,
                  jobs_pages=_pages(total, JOBS_PER_PAGE, page), datasets_pages=_pages(dtotal, DATASETS_PER_PAGE, dpage),
                  choices=_engine_choices(), defaults={"mode": settings.default_mode,
                                                       "backbone": settings.default_backbone,
                                                       "formulation": settings.default_formulation,
                                                       "init": settings.default_init},
                  max_epochs=settings.max_epochs)


def _safe_next(url: str | None) -> str:
    return url if url and url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


@router.get("/ui/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/"):
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/ui/login", response_class=HTMLResponse)
async def login(request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
    """Checks the key and keeps it in an HttpOnly cookie: the pages then act as that key."""
    key = key.strip()
    owner = await run_in_threadpool(_owner_for_key, request, key) if key else None
    if owner is None:
        return render(request, "login.html", status_code=401, next=_safe_next(next),
                      error="This key is not valid (or was revoked). Keys are created with `sp2ot create-api-key NAME`.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, key, max_age=int(request.app.state.settings.session_cookie_days * 86400),
                        httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/")
    return response


def _owner_for_key(request: Request, key: str) -> Owner | None:
    with request.app.state.db.read_session() as s:
        return crud.owner_for_key(s, key)


@router.post("/ui/logout")
async def logout(request: Request, csrf_token: Annotated[str, Form()] = ""):
    check_csrf(request, request.cookies.get(SESSION_COOKIE) or "", csrf_token)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ---------------------------------------------------------------------------------- job page
def _live(job: JobRecord) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    started = job.started_at
    if started is not None and started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    finished = job.finished_at
    if finished is not None and finished.tzinfo is None:
        finished = finished.replace(tzinfo=timezone.utc)
    elapsed = ((finished or now) - started).total_seconds() if started else 0.0
    return {"id": job.id, "status": job.status, "progress": job.progress or {}, "error": job.error,
            "elapsed": max(0.0, elapsed), "cancel_requested": job.cancel_requested, "attempts": job.attempts}


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, owner: PageOwner, session: ReadSessionDep, storage: StorageDep,
             page: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1):
    """Progress while the job runs; the result view once it succeeded; the error if it failed."""
    job = _job_or_404(session, owner, job_id)
    if job.status != JobStatus.SUCCEEDED:
        return render(request, "progress.html", owner=owner, job=job, live=_live(job))
    info = results.curation_info(session, job.id)
    clusters = _clusters(session, job, info)
    paging = _pages(len(clusters), CARDS_PER_PAGE, page)
    shown = clusters[paging["offset"]:paging["offset"] + CARDS_PER_PAGE]
    images = results.card_images(session, job.id, [c.id for c in shown if c.size], TOP_PER_CARD, LEAST_PER_CARD)
    cards = []
    for c in shown:
        top, least = images.get(c.id, ([], []))
        # The least confident strip only when it shows other images than the top row.
        cards.append({"cluster": c, "top": top, "least": least if c.size > TOP_PER_CARD else []})
    names = {c.id: c.name for c in clusters if c.named}
    history = [curation.describe(e, names) for e in curation.history(session, job.id, limit=8)] if info.curated else []
    artifacts_made = (job.summary or {}).get("artifacts", {})
    return render(request, "result.html", owner=owner, job=job, clusters=clusters, cards=cards, paging=paging,
                  curation=info, history=history, tab="clusters", has_map=bool(artifacts_made.get("map")),
                  map_method=artifacts_made.get("map"), curve=job.history or [],
                  k_curve=k_curve_drawing((job.summary or {}).get("k_choice")),
                  sizes=[{"id": c.id, "name": c.name, "size": c.size} for c in clusters])


def k_curve_drawing(k_choice: dict[str, Any] | None, width: int = 600, height: int = 140) -> dict[str, Any] | None:
    """The chosen-K curve as an SVG polyline (K left to right, criterion bottom to top), or None."""
    if not k_choice or not k_choice.get("curve"):
        return None
    curve = [(int(k), v) for k, v in k_choice["curve"]]
    values = [v for _, v in curve if v is not None] or [0.0]
    lo, hi = min(values), max(values)
    k0, k1 = curve[0][0], curve[-1][0]

    def xy(k: int, v: float | None) -> tuple[float, float]:
        x = 8 + (width - 16) * ((k - k0) / (k1 - k0) if k1 > k0 else 0.5)
        y = height - 8 - (height - 16) * (((v if v is not None else lo) - lo) / (hi - lo) if hi > lo else 0.5)
        return round(x, 1), round(y, 1)

    chosen = int(k_choice["chosen"])
    cx, cy = xy(chosen, dict(curve).get(chosen))
    return {**k_choice, "curve": curve, "width": width, "height": height, "chosen_x": cx, "chosen_y": cy,
            "points": " ".join(f"{x},{y}" for x, y in (xy(k, v) for k, v in curve))}


@router.get("/ui/jobs/{job_id}/live.json")
def job_live(job_id: str, owner: OwnerDep, session: ReadSessionDep):
    """What the progress page polls: status, progress (with the loss/rho curve so far), elapsed seconds."""
    job = repository.get_job(session, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key.")
    return JSONResponse(_live(job), headers={"Cache-Control": "no-store"})


def _image_list(request: Request, owner: Owner, session, job: JobRecord, images: list[results.Image], *,
                title: str, tab: str, paging: dict[str, int] | None, more: bool = False,
                clusters: list[results.Cluster] | None = None, **extra: Any):
    clusters = clusters if clusters is not None else _clusters(session, job)
    return render(request, "images.html", owner=owner, job=job, images=images, title=title, tab=tab,
                  paging=paging, more=more, clusters=clusters, names={c.id: c.name for c in clusters},
                  has_map=bool((job.summary or {}).get("artifacts", {}).get("map")), **extra)


@router.get("/ui/jobs/{job_id}/clusters/{cluster}", response_class=HTMLResponse)
def cluster_page(request: Request, job_id: str, cluster: ClusterNumber, owner: PageOwner, session: ReadSessionDep,
                 page: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1, order: str = "confident"):
    """All images of a cluster, most confident first (``order=uncertain``: least first), paginated."""
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    clusters = _clusters(session, job)
    this = next((c for c in clusters if c.id == cluster), None)
    if this is None:
        raise NotFound(f"Job {job.id} has no cluster {cluster}.")
    paging = _pages(this.size, IMAGES_PER_PAGE, page)
    images = results.images_of_cluster(session, job.id, cluster, offset=paging["offset"], limit=IMAGES_PER_PAGE,
                                       least_confident=order == "uncertain")
    return _image_list(request, owner, session, job, images, title=f"{this.name}: {this.size} images",
                       tab="cluster", paging=paging, clusters=clusters, cluster=cluster, order=order)


@router.get("/ui/jobs/{job_id}/uncertain", response_class=HTMLResponse)
def uncertain_page(request: Request, job_id: str, owner: PageOwner, session: ReadSessionDep,
                   page: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1):
    """The least confident images of all clusters: where a person should look first."""
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    paging = _pages(job.summary.get("n_images", 0) if job.summary else 0, IMAGES_PER_PAGE, page)
    images = results.least_confident(session, job.id, offset=paging["offset"], limit=IMAGES_PER_PAGE)
    return _image_list(request, owner, session, job, images, title="Uncertain images (least confident first)",
                       tab="uncertain", paging=paging)


@router.get("/ui/jobs/{job_id}/search", response_class=HTMLResponse)
def search_page(request: Request, job_id: str, owner: PageOwner, session: ReadSessionDep, q: str = "",
                page: Annotated[int, Query(ge=1, le=MAX_PAGE_NUMBER)] = 1):
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    q = q.strip()[:200]
    offset = (page - 1) * IMAGES_PER_PAGE
    found = results.search(session, job.id, q, offset=offset, limit=IMAGES_PER_PAGE + 1) if q else []
    more = len(found) > IMAGES_PER_PAGE
    return _image_list(request, owner, session, job, found[:IMAGES_PER_PAGE],
                       title=f"File names containing “{q}”" if q else "Search by file name", tab="search",
                       paging=None, more=more, q=q, page=page)


@router.get("/ui/jobs/{job_id}/images/{idx}", response_class=HTMLResponse)
def image_page(request: Request, job_id: str, idx: ImageIndex, owner: PageOwner, session: ReadSessionDep):
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    im = results.image(session, job.id, idx)
    if im is None:
        raise NotFound(f"Job {job.id} has no image number {idx}.")
    return _image_list(request, owner, session, job, [im], title=im.filename, tab="image", paging=None,
                       single=im)


@router.get("/ui/jobs/{job_id}/map", response_class=HTMLResponse)
def map_page(request: Request, job_id: str, owner: PageOwner, session: ReadSessionDep):
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    clusters = _clusters(session, job)
    made = (job.summary or {}).get("artifacts", {})
    return render(request, "map.html", owner=owner, job=job, tab="map", has_map=bool(made.get("map")),
                  map_method=made.get("map"),
                  legend=[{"id": c.id, "name": c.name, "size": c.size} for c in clusters])


@router.get("/ui/jobs/{job_id}/map.bin")
def map_data(job_id: str, owner: OwnerDep, session: ReadSessionDep, storage: StorageDep):
    """N x 2 float32 positions then N int32 current clusters, little-endian."""
    import numpy as np

    job = repository.get_job(session, owner, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} for this API key.")
    _succeeded_or_409(job)
    coords = artifacts.read_map(storage.job_dir(job.id))
    if coords is None:
        raise NotFound(f"Job {job.id} has no map (it was made without the features).")
    labels = np.asarray(results.labels_in_order(session, job.id), dtype="<i4")
    if len(coords) != 8 * len(labels):
        raise NotFound(f"The map of job {job.id} does not match its images.")
    return Response(coords + labels.tobytes(), media_type="application/octet-stream",
                    headers={"Cache-Control": "no-store"})


@router.get("/ui/jobs/{job_id}/metrics", response_class=HTMLResponse)
def metrics_page(request: Request, job_id: str, owner: PageOwner, session: ReadSessionDep, storage: StorageDep):
    """With a truth CSV: the paper's metrics and a per-class table, of the current clusters."""
    job = _job_or_404(session, owner, job_id)
    _succeeded_or_409(job)
    info = results.curation_info(session, job.id)
    ev = (results.evaluation(session, job.id, storage.truth_path(job.id), info.version)
          if job.has_truth else None)
    names = results.cluster_names(session, job.id)
    return render(request, "metrics.html", owner=owner, job=job, tab="metrics", ev=ev, curation=info,
                  names=names, curve=job.history or [],
                  has_map=bool((job.summary or {}).get("artifacts", {}).get("map")))


# ------------------------------------------------------------------------- images, thumbnails
def _thumb_response(request: Request, data: bytes | None, etag: str) -> Response:
    if data is None or data == b"":
        return Response(PLACEHOLDER, media_type="image/svg+xml", headers={"Cache-Control": "private, max-age=60"})
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": THUMB_CACHE})
    return Response(data, media_type="image/jpeg", headers={"ETag": etag, "Cache-Control": THUMB_CACHE})


@router.get("/ui/jobs/{job_id}/thumbs/{idx}.jpg")
def thumbnail(request: Request, job_id: str, idx: ImageIndex, owner: OwnerDep, session: ReadSessionDep,
              storage: StorageDep):
    """A small JPEG made by the worker; the same key's rules as the job (404 otherwise)."""
    job = repository.get_job(session, owner, job_id)
    if job is None or idx < 0 or idx >= job.n_images:
        raise NotFound(f"No thumbnail {idx} of job {job_id!r} for this API key.")
    return _thumb_response(request, artifacts.read_thumbnail(storage.job_dir(job.id), idx), f'"{job.id}-{idx}"')


@router.get("/ui/jobs/{job_id}/original/{idx}")
def original(job_id: str, idx: ImageIndex, owner: OwnerDep, session: ReadSessionDep, storage: StorageDep):
    """The original file as uploaded, read from the stored upload through its manifest (sent
    as it is: the server does not decode it)."""
    job = repository.get_job(session, owner, job_id)
    im = results.image(session, job.id, idx) if job is not None else None
    if im is None:
        raise NotFound(f"No image {idx} of job {job_id!r} for this API key.")
    try:
        with storage.open_uploads.use(storage.abs(job.input_path)) as images:
            i = bisect.bisect_left(images.names, im.filename)  # the names are sorted
            if images.names[i:i + 1] != [im.filename]:
                raise ValueError(f"{im.filename} is not in the upload")
            data, kind = images.read_bytes(i), images.members[i].type
    except (OSError, ValueError):  # the upload is gone (its dataset was deleted) or changed
        raise NotFound(f"The original of {im.filename} is no longer stored (its dataset was deleted).") from None
    media = ORIGINAL_TYPES.get(kind) or mimetypes.guess_type(im.filename)[0] or "application/octet-stream"
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600",
                                                     "X-Content-Type-Options": "nosniff"})
