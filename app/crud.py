"""Database reads and writes of API keys, datasets and upload usage, used by the API and the CLI (a job's
are in ``app/jobs/repository.py``). Every dataset query of a request is scoped to its owner:
another key's rows are invisible (404)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import (
    LOCAL_OWNER_HASH,
    LOCAL_OWNER_NAME,
    Owner,
    display_prefix,
    generate_api_key,
    hash_api_key,
)
from app.models import ApiKey, Dataset, UploadUsage, utcnow


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


def key_hash_of(session: Session, owner: Owner) -> str:
    """The stored hash of the owner's API key (what its callback secret is derived from)."""
    return session.scalar(select(ApiKey.key_hash).where(ApiKey.id == owner.id))


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


def mark_dataset_used(dataset: Dataset) -> None:
    """A job is being created from the dataset (retention counts from its last use)."""
    dataset.last_used_at = utcnow()


def unused_dataset_ids(session: Session, used_before: datetime, limit: int) -> list[str]:
    """Datasets uploaded and last used before ``used_before`` (the longest unused first)."""
    return list(session.scalars(
        select(Dataset.id).where(Dataset.last_used_at < used_before).order_by(Dataset.last_used_at).limit(limit)
    ))


def lock_unused_dataset(session: Session, dataset_id: str, used_before: datetime) -> Dataset | None:
    """The dataset, locked until the transaction ends, if it is still unused since ``used_before``
    (a job being created from it locks it too, and marks it used)."""
    return session.scalars(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.last_used_at < used_before).with_for_update()
    ).first()


def delete_dataset(session: Session, dataset: Dataset) -> None:
    """Delete the row (its files are the caller's); its finished jobs keep their results."""
    session.delete(dataset)


def uploads_since(session: Session, owner: Owner, since: datetime) -> list[tuple[datetime, int]]:
    """``(at, bytes)`` of the owner's uploads since ``since``, oldest first."""
    rows = session.execute(select(UploadUsage.at, UploadUsage.bytes)
                           .where(UploadUsage.owner_id == owner.id, UploadUsage.at > since)
                           .order_by(UploadUsage.at))
    return [(at, int(n)) for at, n in rows]


def record_upload(session: Session, owner: Owner, nbytes: int, *, forget_before: datetime) -> None:
    """Count an upload of ``nbytes`` for ``owner``; drop its rows older than ``forget_before``."""
    session.execute(delete(UploadUsage).where(UploadUsage.owner_id == owner.id, UploadUsage.at <= forget_before))
    session.add(UploadUsage(owner_id=owner.id, bytes=int(nbytes)))
