"""Request dependencies: settings, database sessions, the caller's identity."""
from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import crud
from app.core.config import Settings, is_loopback_host
from app.core.db import Database
from app.core.security import Owner, csrf_token, hash_api_key, load_or_create_secret
from app.errors import ApiError
from app.storage import Storage


# Trivial dependencies are async: FastAPI would run sync ones in the thread pool.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.db


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_upload_dir(request: Request) -> Path:
    """Where this process receives uploads (its ``UploadArea``)."""
    return request.app.state.upload_area.path


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.session() as session:
        yield session


def get_read_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.read_session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
StorageDep = Annotated[Storage, Depends(get_storage)]
UploadDirDep = Annotated[Path, Depends(get_upload_dir)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, detail: str):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="sp2ot"'})


class CsrfRejected(ApiError):
    status_code = 403


SESSION_COOKIE = "sp2ot_key"  # the web pages' login: the API key, HttpOnly
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def server_secret(app) -> bytes:
    secret = getattr(app.state, "secret", None)
    if secret is None:
        settings: Settings = app.state.settings
        secret = app.state.secret = load_or_create_secret(settings.secret_key, settings.data_dir / "secret_key")
    return secret


def session_csrf_token(request: Request) -> str:
    """The token the pages send back with every state-changing request."""
    return csrf_token(server_secret(request.app), request.cookies.get(SESSION_COOKIE) or "")


def _from_a_browser(request: Request) -> bool:
    # Browsers add these to every cross-site POST; scripts (curl, the Python client) do not.
    headers = request.headers
    return "origin" in headers or "sec-fetch-site" in headers


def check_csrf(request: Request, credential: str, submitted: str | None = None) -> None:
    token = submitted or request.headers.get(CSRF_HEADER) or request.query_params.get(CSRF_FIELD) or ""
    expected = csrf_token(server_secret(request.app), credential)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise CsrfRejected(
            "This request changes something and comes from a browser, so it needs the page's CSRF token "
            f"(header {CSRF_HEADER}). Reload the page and try again; scripts send `Authorization: Bearer <key>`."
        )


class _KeyCache:
    """Recently verified keys (hash -> owner) for a few seconds, so that pollers do not pay a
    database round trip per request. A revoked key stops working within ``ttl`` seconds."""

    def __init__(self, ttl: float = 5.0, size: int = 4096):
        self.ttl = ttl
        self.size = size
        self._data: dict[str, tuple[float, Owner]] = {}

    def get(self, key: str) -> Owner | None:
        hit = self._data.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, key: str, owner: Owner) -> None:
        if len(self._data) >= self.size:
            self._data.clear()
        self._data[key] = (time.monotonic() + self.ttl, owner)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("The Authorization header must be `Bearer <API key>`.")
    return value.strip()


async def current_owner(request: Request) -> Owner:
    """The key's owner. Without a key: 401 when authentication is required; otherwise the
    local owner, and only for clients on this machine. (Async: a cached key costs no thread
    hop and no database round trip.)"""
    settings: Settings = request.app.state.settings
    cache: _KeyCache = request.app.state.key_cache
    key = _bearer(request)
    from_cookie = False
    if key is None and request.cookies.get(SESSION_COOKIE):
        key, from_cookie = request.cookies[SESSION_COOKIE], True
    # A bearer header is never sent by a browser on its own: only cookie or keyless requests
    # from a browser can be forged by another site.
    if request.method in UNSAFE_METHODS and (from_cookie or (key is None and _from_a_browser(request))):
        check_csrf(request, key or "")
    if key is None:
        if settings.auth_required:
            raise Unauthorized(
                "Authentication required: send `Authorization: Bearer <API key>` "
                "(an administrator creates keys with `sp2ot create-api-key NAME`)."
            )
        client = request.client.host if request.client else ""  # "" for a Unix socket
        if client and not is_loopback_host(client):
            raise Unauthorized(
                "This server runs without authentication and only answers requests from its own machine. "
                "Set SP2OT_AUTH_REQUIRED=true and use an API key to access it remotely."
            )
        cache_key = ""
    else:
        cache_key = hash_api_key(key)
    owner = cache.get(cache_key)
    if owner is None:
        pool = request.app.state.read_pool
        if key is not None and pool is not None:
            owner = await pool.owner_for_key(key)
        else:
            owner = await run_in_threadpool(_lookup_owner, request.app.state.db, key)
        if owner is None:
            raise Unauthorized("Invalid or revoked API key.")
        cache.put(cache_key, owner)
    return owner


def _lookup_owner(db: Database, key: str | None) -> Owner | None:
    if key is None:
        with db.session() as session:
            return crud.local_owner(session)
    with db.read_session() as session:
        return crud.owner_for_key(session, key)


OwnerDep = Annotated[Owner, Depends(current_owner)]
