"""Every query and every state change of a job and of its result rows.

States and the moves between them (:data:`TRANSITIONS`)::

    queued  -> running     a worker starts attempt n + 1                         (claim)
    queued  -> cancelled   cancelled before a worker started it                  (request_cancel, claim)
    queued  -> failed      its attempts are used up                              (claim)
    running -> succeeded   the results are written in the same transaction      (record_success)
    running -> failed      the engine failed, the time limit, or its worker died
                           max_attempts times                                    (end_attempt, settle_abandoned)
    running -> cancelled   its worker stopped on the cancel flag, or it was
                           cancelled while no worker lived                       (end_attempt, settle_abandoned)
    running -> queued      its worker is gone: the attempt is given up           (settle_abandoned, claim)

Succeeded, failed and cancelled are final. Every state write goes through :func:`_transition`:
it raises :class:`IllegalTransition` on a move the table does not list, and it is one
conditional ``UPDATE ... WHERE status = <from> AND attempts = <attempt>``. ``attempts`` is the
token of one run: a run that was superseded (re-queued, taken over, deleted) changes nothing,
and learns it from the row count. The caller owns the transaction (``db.begin()`` or a
request's session); functions that commit say so.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Literal

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import Owner
from app.models import ApiKey, AssignRequest, Assignment, Job, JobStatus, utcnow

log = logging.getLogger("sp2ot.jobs")

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

BUSY = "busy"
ABANDONED_IDS_REPORTED = 20


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the caller, never user input)."""


def check_transition(source: str, target: str) -> None:
    if target not in TRANSITIONS.get(source, frozenset()):
        allowed = ", ".join(sorted(TRANSITIONS.get(source, ()))) or "nothing (final state)"
        raise IllegalTransition(f"a job cannot go from {source!r} to {target!r}; from {source!r}: {allowed}")


def _transition(session: Session, job_id: str, attempt: int, source: str, target: str, *,
                where: Sequence[Any] = (), **values: Any) -> bool:
    """Move the job from ``source`` to ``target`` if it is still in ``source`` at ``attempt``
    (and ``where`` holds), setting ``values`` too. True when the row changed."""
    check_transition(source, target)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == source, Job.attempts == attempt, *where)
        .values(status=target, **values)
    )
    return res.rowcount == 1


# ---------------------------------------------------------------------------------- reads
JOB_COLUMNS = tuple(Job.__table__.c)
_JOBS = select(*JOB_COLUMNS)
# The one read of a job by its id, for its owner: by the API's sessions (get_job) and, as
# SQL text, by the asynchronous PostgreSQL read pool (get_job_async).
JOB_BY_ID = _JOBS.where(Job.id == bindparam("job_id"), Job.owner_id == bindparam("owner_id"))


class JobRecord(SimpleNamespace):
    """A job as read: one attribute per column of ``jobs`` (plain values, no ORM session)."""


def _record(row) -> JobRecord | None:
    return JobRecord(**row) if row is not None else None


def _records(rows) -> list[JobRecord]:
    return [JobRecord(**row) for row in rows]


def get_job(conn, owner: Owner, job_id: str) -> JobRecord | None:
    """The job ``job_id`` of ``owner``, or None. ``conn``: a Session or a Connection."""
    return _record(conn.execute(JOB_BY_ID, {"job_id": job_id, "owner_id": owner.id}).mappings().first())


def get_job_for_update(session: Session, owner: Owner, job_id: str) -> JobRecord | None:
    """:func:`get_job`, the row locked until the transaction ends (curation edits of one job
    run one after the other)."""
    stmt = JOB_BY_ID.with_for_update()
    return _record(session.execute(stmt, {"job_id": job_id, "owner_id": owner.id}).mappings().first())


@lru_cache(maxsize=1)
def _job_by_id_psycopg() -> str:
    from sqlalchemy.dialects.postgresql import psycopg

    return str(JOB_BY_ID.compile(dialect=psycopg.dialect()))


async def get_job_async(read_pool, owner: Owner, job_id: str) -> JobRecord | None:
    """:func:`get_job` on the event loop, through ``app.core.fastread.AsyncReadPool``."""
    return _record(await read_pool.fetchone(_job_by_id_psycopg(), {"job_id": job_id, "owner_id": owner.id}))


def _by_id(session: Session, job_id: str, *, lock: bool = False, skip_locked: bool = False) -> JobRecord | None:
    stmt = _JOBS.where(Job.id == job_id)
    if lock:
        stmt = stmt.with_for_update(skip_locked=skip_locked)
    return _record(session.execute(stmt).mappings().first())


def find_by_idempotency_key(session: Session, owner: Owner, key: str) -> JobRecord | None:
    stmt = _JOBS.where(Job.owner_id == owner.id, Job.idempotency_key == key)
    return _record(session.execute(stmt).mappings().first())


def list_jobs(session: Session, owner: Owner, limit: int, offset: int, statuses: Iterable[str] | None = None,
              dataset_id: str | None = None) -> tuple[list[JobRecord], int]:
    """A page of the owner's jobs, newest first, and how many there are in all."""
    conds = [Job.owner_id == owner.id]
    if statuses:
        conds.append(Job.status.in_(list(statuses)))
    if dataset_id:
        conds.append(Job.dataset_id == dataset_id)
    total = session.scalar(select(func.count()).select_from(Job).where(*conds)) or 0
    rows = session.execute(
        _JOBS.where(*conds).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).mappings()
    return _records(rows), total


def active_job_ids(session: Session, dataset_id: str | None = None) -> list[str]:
    """Queued and running jobs, oldest first; only those of ``dataset_id`` when given."""
    conds = [Job.status.in_(JobStatus.ACTIVE)]
    if dataset_id is not None:
        conds.append(Job.dataset_id == dataset_id)
    return list(session.scalars(select(Job.id).where(*conds).order_by(Job.created_at, Job.id)))


def count_active(session: Session, owner: Owner) -> int:
    """How many queued and running jobs ``owner`` has (the per-key limit)."""
    return int(session.scalar(select(func.count()).select_from(Job)
                              .where(Job.owner_id == owner.id, Job.status.in_(JobStatus.ACTIVE))) or 0)


# ------------------------------------------------------------------- create, cancel, delete
def create_job(session: Session, owner: Owner, **fields: Any) -> tuple[JobRecord, bool]:
    """Insert a queued job of ``owner`` and commit. When its ``idempotency_key`` was used at the
    same moment by another request of the owner, nothing is inserted: that job is returned
    with False."""
    job = Job(owner_id=owner.id, status=QUEUED, attempts=0, **fields)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        key = fields.get("idempotency_key")
        existing = find_by_idempotency_key(session, owner, key) if key else None
        if existing is None:
            raise
        return existing, False
    return _by_id(session, job.id), True


def request_cancel(session: Session, job_id: str) -> JobRecord | None:
    """Cancel a queued job at once; flag a running one (its worker stops at its next check,
    or the reaper ends it when it has no worker). Commits; returns the job as it is now."""
    for _ in range(3):  # the job may move between the read and the write: look again
        job = _by_id(session, job_id)
        if job is None or job.status not in JobStatus.ACTIVE:
            return job
        if job.status == QUEUED:
            done = _transition(session, job.id, job.attempts, QUEUED, CANCELLED, cancel_requested=True,
                               finished_at=utcnow(), progress={**(job.progress or {}), "stage": "cancelled"})
        else:
            done = session.execute(
                update(Job).where(Job.id == job.id, Job.status == RUNNING, Job.attempts == job.attempts)
                .values(cancel_requested=True)
            ).rowcount == 1
        session.commit()
        if done:
            break
    return _by_id(session, job_id)


def delete_job(session: Session, job_id: str) -> None:
    """Delete the job and its result rows (its files are the caller's). A running attempt
    finds its row gone at its next write and stops."""
    session.execute(delete(Assignment).where(Assignment.job_id == job_id))
    session.execute(delete(AssignRequest).where(AssignRequest.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))


def expired_job_ids(session: Session, finished_before: datetime, limit: int) -> list[str]:
    """Succeeded, failed or cancelled jobs that finished before ``finished_before``."""
    return list(session.scalars(
        select(Job.id).where(Job.status.in_(JobStatus.TERMINAL), Job.finished_at < finished_before)
        .order_by(Job.finished_at).limit(limit)
    ))


# ----------------------------------------------------------------------- a worker's attempt
@dataclass(frozen=True)
class Claim:
    """A started attempt: its token and the job as it was when it started."""

    attempt: int
    job: JobRecord


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite gives naive datetimes back: they are UTC.
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def _has_live_worker(job: JobRecord, now: datetime, heartbeat_timeout: float) -> bool:
    beat = _aware(job.heartbeat_at)
    return beat is not None and now - beat < timedelta(seconds=heartbeat_timeout)


def exhausted_message(attempts: int) -> str:
    return (f"The job was started {attempts} times and its worker died each time (it crashed, was killed, ran "
            "out of memory or reached the hard time limit). Try fewer or smaller images, or fewer epochs.")


def _give_up_attempt(session: Session, job: JobRecord, max_attempts: int) -> str | None:
    """A running job whose worker is gone: cancelled when a cancel was asked, failed when its
    attempts are used up, else queued again. Returns the new status, or None when the row
    moved on since ``job`` was read."""
    now = utcnow()
    if job.cancel_requested:
        target, values = CANCELLED, {"finished_at": now, "progress": {**(job.progress or {}), "stage": "cancelled"}}
    elif job.attempts >= max_attempts:
        target, values = FAILED, {"finished_at": now, "error": exhausted_message(job.attempts),
                                  "progress": {**(job.progress or {}), "stage": "failed"}}
    else:
        target, values = QUEUED, {"progress": {**(job.progress or {}), "stage": "queued"}}
    if not _transition(session, job.id, job.attempts, RUNNING, target, **values):
        return None
    if target == FAILED:
        log.error("job %s: giving up after %d attempts", job.id, job.attempts)
    return target


_MOVED = object()


def claim(session: Session, job_id: str, *, worker_name: str, heartbeat_timeout: float, max_attempts: int,
          takeover: bool = False) -> Claim | Literal["busy"] | None:
    """Start a new attempt (queued -> running, ``attempts + 1``). A running job is taken
    over (running -> queued -> running) when its heartbeat is older than ``heartbeat_timeout``
    or with ``takeover`` (the caller knows its worker is gone). Returns the claim, ``"busy"``
    when a live worker runs the job, or None when there is nothing to run (no such job, final,
    or ended now: cancelled, or its attempts used up)."""
    for _ in range(5):
        # SQLite has no row locks: when the row moved between the read and the write, read again.
        outcome = _claim_once(session, job_id, worker_name, heartbeat_timeout, max_attempts, takeover)
        if outcome is not _MOVED:
            return outcome
    return None


def _claim_once(session: Session, job_id: str, worker_name: str, heartbeat_timeout: float, max_attempts: int,
                takeover: bool):
    now = utcnow()
    job = _by_id(session, job_id, lock=True)
    if job is None or job.status in JobStatus.TERMINAL:
        return None
    if job.status == RUNNING:
        if not takeover and _has_live_worker(job, now, heartbeat_timeout):
            return BUSY
        log.warning("job %s: worker %s of attempt %d stopped answering", job_id, job.worker, job.attempts)
        status = _give_up_attempt(session, job, max_attempts)
        if status is None:
            return _MOVED
        if status != QUEUED:
            return None
        job = _by_id(session, job_id)
    if job.cancel_requested or job.attempts >= max_attempts:
        target = CANCELLED if job.cancel_requested else FAILED
        moved = _transition(session, job.id, job.attempts, QUEUED, target, finished_at=now,
                            error=None if target == CANCELLED else exhausted_message(job.attempts),
                            progress={**(job.progress or {}), "stage": target})
        return None if moved else _MOVED
    attempt = job.attempts + 1
    if not _transition(session, job.id, job.attempts, QUEUED, RUNNING, attempts=attempt, started_at=now,
                       heartbeat_at=now, worker=worker_name[:255], error=None,
                       progress={"stage": "loading", "percent": 0.0}):
        return _MOVED
    return Claim(attempt, job)


def _current_run(job_id: str, attempt: int) -> tuple:
    return (Job.id == job_id, Job.attempts == attempt, Job.status == RUNNING)


def beat(session: Session, job_id: str, attempt: int) -> bool:
    """Refresh the heartbeat of this attempt. False: the attempt is no longer current."""
    res = session.execute(update(Job).where(*_current_run(job_id, attempt)).values(heartbeat_at=utcnow()))
    return res.rowcount == 1


def save_progress(session: Session, job_id: str, attempt: int, progress: dict[str, Any]) -> bool:
    """Write this attempt's progress (and heartbeat). False: the attempt is no longer current."""
    res = session.execute(
        update(Job).where(*_current_run(job_id, attempt)).values(progress=progress, heartbeat_at=utcnow())
    )
    return res.rowcount == 1


def stop_reason(session: Session, job_id: str, attempt: int) -> Literal["cancel", "superseded"] | None:
    """Why this attempt should stop now: ``"superseded"`` (the job moved on or is gone),
    ``"cancel"`` (a cancel was asked), or None."""
    row = session.execute(
        select(Job.attempts, Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).first()
    if row is None or row.attempts != attempt or row.status != RUNNING:
        return "superseded"
    return "cancel" if row.cancel_requested else None


def end_attempt(session: Session, job_id: str, attempt: int, status: str, error: str | None = None,
                stage: str | None = None) -> bool:
    """End this attempt without results: running -> ``status`` (failed or cancelled).
    False: the attempt is no longer current."""
    job = _by_id(session, job_id, lock=True)
    if job is None or job.attempts != attempt or job.status != RUNNING:
        return False
    return _transition(session, job_id, attempt, RUNNING, status, error=error, finished_at=utcnow(),
                       progress={**(job.progress or {}), "stage": stage or status})


def record_success(session: Session, job_id: str, attempt: int, *, summary: dict[str, Any],
                   history: list[dict[str, Any]], metrics: dict[str, Any] | None, progress: dict[str, Any],
                   filenames: Sequence[str], labels: Sequence[int], confidences: Sequence[float],
                   flags: ImageFlags | None = None, n_clusters: int | None = None) -> bool:
    """running -> succeeded with its results, unless a cancel was asked meanwhile; the
    assignment rows of an earlier attempt are replaced. ``n_clusters``: the K the worker chose
    (a job that left K to it). False: nothing was written."""
    now = utcnow()
    chosen = {"n_clusters": n_clusters} if n_clusters is not None else {}
    if not _transition(session, job_id, attempt, RUNNING, SUCCEEDED, where=(Job.cancel_requested.is_(False),),
                       summary=summary, history=history, metrics=metrics, finished_at=now, heartbeat_at=now,
                       progress=progress, error=None, **chosen):
        return False
    session.execute(delete(Assignment).where(Assignment.job_id == job_id))
    bulk_insert_assignments(session, job_id, filenames, labels, confidences, flags)
    return True


@dataclass
class ImageFlags:
    """The engine's per-image flags, one entry per image: outlier score, outlier, the filename
    of the earlier image it duplicates (None: none)."""

    outlier_scores: Sequence[float]
    outliers: Sequence[bool]
    duplicate_of: Sequence[str | None]


_ASSIGNMENT_FIELDS = ("job_id", "idx", "filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of")


def bulk_insert_assignments(session: Session, job_id: str, filenames, labels, confidences,
                            flags: ImageFlags | None = None) -> None:
    """One row per image (``COPY`` on PostgreSQL, batched inserts elsewhere), in the session's
    transaction. Without ``flags`` the flag columns stay null."""
    n = len(filenames)
    scores = flags.outlier_scores if flags is not None else [None] * n
    outliers = flags.outliers if flags is not None else [None] * n
    duplicates = flags.duplicate_of if flags is not None else [None] * n
    rows = ((job_id, i, str(f), int(c), float(p), None if s is None else float(s), None if o is None else bool(o),
             None if d is None else str(d))
            for i, (f, c, p, s, o, d) in enumerate(zip(filenames, labels, confidences, scores, outliers, duplicates)))
    if session.bind.dialect.name == "postgresql":
        raw = session.connection().connection.driver_connection  # psycopg 3, same transaction
        with raw.cursor() as cur:
            with cur.copy(f"COPY assignments ({', '.join(_ASSIGNMENT_FIELDS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        return
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(dict(zip(_ASSIGNMENT_FIELDS, row)))
        if len(batch) >= 10_000:
            session.execute(insert(Assignment), batch)
            batch = []
    if batch:
        session.execute(insert(Assignment), batch)


# -------------------------------------------------------------- jobs without a live worker
def _abandoned(heartbeat_timeout: float) -> tuple:
    cutoff = utcnow() - timedelta(seconds=heartbeat_timeout)
    return (Job.status == RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))


def abandoned_job_ids(session: Session, heartbeat_timeout: float, limit: int | None = None) -> list[str]:
    """Running jobs whose heartbeat is older than ``heartbeat_timeout``: their worker is gone."""
    stmt = select(Job.id).where(*_abandoned(heartbeat_timeout)).order_by(Job.heartbeat_at, Job.id)
    return list(session.scalars(stmt.limit(limit) if limit else stmt))


def count_abandoned(session: Session, heartbeat_timeout: float) -> tuple[int, list[str]]:
    """How many running jobs have no live worker, and the ids of the first few."""
    total = session.scalar(select(func.count()).select_from(Job).where(*_abandoned(heartbeat_timeout))) or 0
    return total, abandoned_job_ids(session, heartbeat_timeout, ABANDONED_IDS_REPORTED) if total else []


def settle_abandoned(session: Session, job_id: str, *, heartbeat_timeout: float, max_attempts: int) -> str | None:
    """If the job still runs without a live worker, end it (cancelled when a cancel was asked,
    failed when its attempts are used up) or queue it again. The row stays locked until the
    caller's transaction ends, so the caller sends a re-queued job to the queue before
    committing; a job locked by someone else is left for the next pass. Returns the new
    status, or None when nothing changed."""
    job = _by_id(session, job_id, lock=True, skip_locked=True)
    if job is None or job.status != RUNNING or _has_live_worker(job, utcnow(), heartbeat_timeout):
        return None
    log.warning("job %s: worker %s of attempt %d stopped answering", job_id, job.worker, job.attempts)
    return _give_up_attempt(session, job, max_attempts)


# ------------------------------------------------------------------- completion callbacks
CALLBACK_PENDING, CALLBACK_SENT, CALLBACK_FAILED = "pending", "sent", "failed"


@dataclass(frozen=True)
class CallbackDue:
    """A final job whose callback is still to be delivered, and the owner key's hash (what its
    signing secret is derived from, :func:`app.core.security.callback_secret`)."""

    job: JobRecord
    key_hash: str


def callback_due(session: Session, job_id: str) -> CallbackDue | None:
    """The job when it is final and its callback is pending, else None."""
    row = session.execute(
        select(*JOB_COLUMNS, ApiKey.key_hash).join(ApiKey, ApiKey.id == Job.owner_id)
        .where(Job.id == job_id, Job.status.in_(JobStatus.TERMINAL), Job.callback_status == CALLBACK_PENDING)
    ).mappings().first()
    if row is None:
        return None
    fields = dict(row)
    key_hash = fields.pop("key_hash")
    return CallbackDue(JobRecord(**fields), key_hash)


def take_callback_attempt(session: Session, job_id: str, attempts: int) -> bool:
    """Count one delivery attempt (``attempts`` -> ``attempts + 1``) if no other sender took it
    first: two senders of one job's callback never post the same attempt."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.callback_status == CALLBACK_PENDING,
                          Job.callback_attempts == attempts)
        .values(callback_attempts=attempts + 1)
    )
    return res.rowcount == 1


def end_callback(session: Session, job_id: str, status: str, error: str | None = None) -> None:
    """The callback was delivered (``sent``) or given up (``failed``, with why)."""
    session.execute(update(Job).where(Job.id == job_id, Job.callback_status == CALLBACK_PENDING)
                    .values(callback_status=status, callback_error=error))


def note_callback_error(session: Session, job_id: str, error: str) -> None:
    """Why the last delivery attempt failed (it will be retried)."""
    session.execute(update(Job).where(Job.id == job_id).values(callback_error=error[:500]))


# --------------------------------------------------- new images assigned to a finished job
class AssignRecord(SimpleNamespace):
    """An assign request as read: one attribute per column of ``assign_requests``."""


_ASSIGN = select(*AssignRequest.__table__.c)


def create_assign_request(session: Session, **fields: Any) -> AssignRecord:
    """Insert a queued assign request and commit."""
    session.add(AssignRequest(status=QUEUED, attempts=0, **fields))
    session.commit()
    return get_assign_request(session, fields["job_id"], fields["id"])


def get_assign_request(conn, job_id: str, request_id: str) -> AssignRecord | None:
    row = conn.execute(_ASSIGN.where(AssignRequest.id == request_id, AssignRequest.job_id == job_id)).mappings().first()
    return AssignRecord(**row) if row is not None else None


def delete_assign_request(session: Session, request_id: str) -> None:
    session.execute(delete(AssignRequest).where(AssignRequest.id == request_id))


def claim_assign_request(session: Session, request_id: str, stale_after: float) -> AssignRecord | None:
    """queued -> running (``attempts + 1``); a request left running longer than ``stale_after``
    seconds (its worker died and the broker delivered the message again) is taken over.
    None: nothing to run (no such request, final, or another worker runs it)."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    row = session.execute(_ASSIGN.where(AssignRequest.id == request_id).with_for_update()).mappings().first()
    if row is None:
        return None
    req = AssignRecord(**row)
    if not (req.status == QUEUED or (req.status == RUNNING and _aware(req.started_at) < stale)):
        return None
    res = session.execute(
        update(AssignRequest).where(AssignRequest.id == request_id, AssignRequest.attempts == req.attempts)
        .values(status=RUNNING, attempts=req.attempts + 1, started_at=now, error=None)
    )
    if res.rowcount != 1:
        return None
    req.attempts += 1
    return req


def end_assign_request(session: Session, request_id: str, attempt: int, status: str, *,
                       summary: dict[str, Any] | None = None, error: str | None = None) -> bool:
    """running -> succeeded (with its summary) or failed (with why), for this attempt only."""
    res = session.execute(
        update(AssignRequest)
        .where(AssignRequest.id == request_id, AssignRequest.status == RUNNING, AssignRequest.attempts == attempt)
        .values(status=status, summary=summary, error=error, finished_at=utcnow())
    )
    return res.rowcount == 1
