"""Per-key fairness: no key fills the workers or the uplink alone.

Two limits per API key (settings; 0 turns one off), both answered with **429** and a
``Retry-After`` header (seconds):

* ``SP2OT_MAX_ACTIVE_JOBS_PER_KEY``: queued + running jobs at once, checked before an upload is
  received (a refused request costs no upload). Concurrent requests of one key may overshoot
  it by the number of requests in flight.
* ``SP2OT_MAX_UPLOAD_BYTES_PER_HOUR``: request bytes of ``POST /jobs`` and ``POST /datasets``
  (accepted or refused) in a sliding hour, counted in the ``upload_usage`` table (shared by
  every API process). A request is refused before it is received when the hour's usage
  plus its ``Content-Length`` is over the budget; ``Retry-After`` is when enough of the hour's
  usage has aged out for it to fit.

A server without keys (SP2OT_AUTH_REQUIRED=false) has one owner, ``local``, for every
client of the machine: the limits apply to it as to one key.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from starlette.requests import Request

from app import crud
from app.core.config import Settings
from app.core.db import Database
from app.core.security import Owner
from app.errors import ApiError, human_bytes
from app.jobs import repository
from app.models import utcnow

WINDOW = timedelta(hours=1)
ACTIVE_RETRY_SECONDS = 30  # when one of the key's jobs ends is unknown: a poll interval


class TooManyRequests(ApiError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after)))})


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)  # SQLite gives naive UTC back


def check_active_jobs(db: Database, settings: Settings, owner: Owner) -> None:
    limit = settings.max_active_jobs_per_key
    if not limit:
        return
    with db.read_session() as s:
        active = repository.count_active(s, owner)
    if active >= limit:
        raise TooManyRequests(
            f"This API key has {active} queued or running jobs, the limit is {limit} "
            "(SP2OT_MAX_ACTIVE_JOBS_PER_KEY). Wait until one finishes, or cancel one, and try again.",
            ACTIVE_RETRY_SECONDS,
        )


def incoming_bytes(request: Request) -> int:
    """The request's ``Content-Length`` (0 when it does not say)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


def check_upload_budget(db: Database, settings: Settings, owner: Owner, incoming: int) -> None:
    """429 when the key's uploads of the last hour plus ``incoming`` bytes exceed the budget."""
    limit = settings.max_upload_bytes_per_hour
    if not limit:
        return
    now = utcnow()
    with db.read_session() as s:
        recent = crud.uploads_since(s, owner, now - WINDOW)
    used = sum(n for _, n in recent)
    if used + incoming <= limit:
        return
    # The earliest moment the rows that age out free enough room for this request.
    wait = WINDOW.total_seconds()
    freed = 0
    for at, n in recent:
        freed += n
        if used - freed + incoming <= limit:
            wait = (_aware(at) + WINDOW - now).total_seconds()
            break
    raise TooManyRequests(
        f"This API key uploaded {human_bytes(used)} in the last hour; with this upload "
        f"({human_bytes(incoming)}) it would be over the limit of {human_bytes(limit)} per hour "
        "(SP2OT_MAX_UPLOAD_BYTES_PER_HOUR). Retry after the seconds in the Retry-After header.",
        math.ceil(wait),
    )


def record_upload(db: Database, settings: Settings, owner: Owner, nbytes: int) -> None:
    if not settings.max_upload_bytes_per_hour or nbytes <= 0:
        return
    with db.session() as s:
        crud.record_upload(s, owner, nbytes, forget_before=utcnow() - WINDOW)
        s.commit()
