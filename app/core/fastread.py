"""Reads on the event loop for the hottest requests (``GET /jobs/{id}`` and API-key lookups)
on PostgreSQL: a small pool of psycopg ``AsyncConnection`` in autocommit mode, prepared
statements, no thread-pool hop and no ORM. Other databases (SQLite) use the thread pool.
The job query is the job repository's (``app.jobs.repository.get_job_async``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.core.security import Owner, hash_api_key
from app.models import ApiKey

log = logging.getLogger("sp2ot.db")

KEY_SQL = f"SELECT id, name FROM {ApiKey.__tablename__} WHERE key_hash = %s AND revoked_at IS NULL"


class AsyncReadPool:
    def __init__(self, conninfo: str, size: int):
        self.conninfo = conninfo
        self._idle: list[Any] = []
        self._slots = asyncio.Semaphore(size)

    async def fetchone(self, sql: str, params: tuple | dict[str, Any]) -> dict[str, Any] | None:
        import psycopg
        from psycopg.rows import dict_row

        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, row_factory=dict_row)
            try:
                cur = await conn.execute(sql, params, prepare=True)
                row = await cur.fetchone()
            except BaseException:
                # Broken or interrupted (cancelled request): never reuse this connection.
                try:
                    await asyncio.shield(conn.close())
                except BaseException:
                    pass
                raise
            self._idle.append(conn)
            return row

    async def close(self) -> None:
        while self._idle:
            try:
                await self._idle.pop().close()
            except Exception:  # pragma: no cover
                pass

    # --- the queries ------------------------------------------------------------------------
    async def owner_for_key(self, key: str) -> Owner | None:
        row = await self.fetchone(KEY_SQL, (hash_api_key(key),))
        return Owner(row["id"], row["name"]) if row is not None else None


def make_read_pool(settings: Settings) -> AsyncReadPool | None:
    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() != "postgresql" or url.get_driver_name() != "psycopg":
        return None
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return AsyncReadPool(conninfo, settings.db_pool_size)
