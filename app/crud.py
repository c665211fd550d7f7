"""Database reads and writes used by the API and the CLI (the worker has its own, in
``worker/tasks.py``). Every dataset/job query is scoped to its owner: another key's rows are
invisible (404)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import (
    LOCAL_OWNER_HASH,
    LOCAL_OWNER_NAME,
    display_prefix,
    generate_api_key,
    hash_api_key,
)
from app.models import ApiKey, Assignment, Dataset, Job, JobStatus, utcnow


@dataclass(frozen=True)
class Owner:
    id: int
    name: str


# ------------------------------------------------------------------------------ api keys
def create_api_key(session: Session, name: str) -> tuple[ApiKey, str]:
    key = generate_api_key()
    row = ApiKey(name=name, key_hash=hash_api_key(key), prefix=display_prefix(key))
    session.add(row)
    session.flush()
    return row, key


def owner_for_key(session: Session, key: str) -> Owner | None:
    row = session.execute(
        select(ApiKey.id, ApiKey.name).where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    return Owner(row.id, row.name) if row else None


def local_owner(session: Session) -> Owner:
    """The owner of requests made without a key while authentication is off."""
    row = session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.key_hash == LOCAL_OWNER_HASH)).first()
    if row:
        return Owner(row.id, row.name)
    try:
        with session.begin_nested():
            key = ApiKey(name=LOCAL_OWNER_NAME, key_hash=LOCAL_OWNER_HASH, prefix="local")
            session.add(key)
        session.commit()
        return Owner(key.id, key.name)
    except IntegrityError:  # created concurrently
        session.rollback()
        row = session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.key_hash == LOCAL_OWNER_HASH)).one()
        return Owner(row.id, row.name)


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.key_hash != LOCAL_OWNER_HASH).order_by(ApiKey.id)))


def revoke_api_key(session: Session, name_or_prefix: str) -> int:
    res = session.execute(
        update(ApiKey)
        .where(
            (ApiKey.name == name_or_prefix) | (ApiKey.prefix == name_or_prefix),
            ApiKey.revoked_at.is_(None),
            ApiKey.key_hash != LOCAL_OWNER_HASH,
        )
        .values(revoked_at=utcnow())
    )
    return res.rowcount or 0


# ------------------------------------------------------------------------------ datasets
def get_dataset(session: Session, owner: Owner, dataset_id: str, *, for_update: bool = False) -> Dataset | None:
    stmt = select(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == owner.id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()


def list_datasets(session: Session, owner: Owner, limit: int, offset: int) -> tuple[list[Dataset], int]:
    where = Dataset.owner_id == owner.id
    total = session.scalar(select(func.count()).select_from(Dataset).where(where)) or 0
    rows = session.scalars(
        select(Dataset).where(where).order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)
    )
    return list(rows), total


def active_jobs_of_dataset(session: Session, dataset_id: str) -> list[Job]:
    return list(
        session.scalars(select(Job).where(Job.dataset_id == dataset_id, Job.status.in_(JobStatus.ACTIVE)))
    )


# ---------------------------------------------------------------------------------- jobs
def get_job(session: Session, owner: Owner, job_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, Job.owner_id == owner.id)).first()


_JOB_COLUMNS = tuple(Job.__table__.c)


def get_job_row(db, owner: Owner, job_id: str):
    """The job as a plain row (Core, autocommit, no ORM): the cheapest read, for polling."""
    stmt = select(*_JOB_COLUMNS).where(Job.id == job_id, Job.owner_id == owner.id)
    with db.read_engine.connect() as conn:
        row = conn.execute(stmt).mappings().first()
    return SimpleNamespace(**row) if row is not None else None


def job_by_idempotency_key(session: Session, owner: Owner, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner_id == owner.id, Job.idempotency_key == key)).first()


def list_jobs(
    session: Session, owner: Owner, limit: int, offset: int, statuses: Iterable[str] | None = None,
    dataset_id: str | None = None,
) -> tuple[list[Job], int]:
    conds = [Job.owner_id == owner.id]
    if statuses:
        conds.append(Job.status.in_(list(statuses)))
    if dataset_id:
        conds.append(Job.dataset_id == dataset_id)
    total = session.scalar(select(func.count()).select_from(Job).where(*conds)) or 0
    rows = session.scalars(
        select(Job).where(*conds).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    )
    return list(rows), total


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop (its worker notices within
    ``cancel_check_interval``). Conditional updates make this safe against the worker
    starting or finishing the job at the same moment."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now,
                progress={**(job.progress or {}), "stage": "cancelled"})
    )
    if not res.rowcount:
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING).values(cancel_requested=True)
        )
    session.commit()
    session.refresh(job)
    return job


def delete_job_rows(session: Session, job_id: str) -> None:
    session.execute(delete(Assignment).where(Assignment.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
