"""API keys: generation and hashing; the caller's identity (:class:`Owner`).

A key is 32 random bytes (``sp2ot_`` + urlsafe base64). Only its sha256 is stored: with
that much entropy a plain hash is as safe as a slow password hash and lets a request be
authenticated with one indexed lookup.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "sp2ot_"


@dataclass(frozen=True)
class Owner:
    """Who makes a request: the API key's row id and name. Every dataset and job belongs to one."""

    id: int
    name: str


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of a key, safe to show to identify it."""
    return key[: len(KEY_PREFIX) + 6]


# The owner of everything created without a key while authentication is off. Its hash
# is not 64 hex digits, so no bearer key can ever match it.
LOCAL_OWNER_HASH = "local:no-authentication"
LOCAL_OWNER_NAME = "local (no authentication)"


def csrf_token(secret: bytes, credential: str) -> str:
    """The CSRF token of a browser session: bound to its credential (the API key in its cookie,
    or "" without authentication) and unforgeable without the server's secret."""
    return hmac.new(secret, b"sp2ot-csrf:" + credential.encode("utf-8"), hashlib.sha256).hexdigest()


def load_or_create_secret(configured: str, path: Path) -> bytes:
    """``configured`` when set, else the random secret in ``path`` (created once, mode 0600)."""
    if configured:
        return configured.encode("utf-8")
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # the first process to create it wins; the others read its secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def callback_secret(secret: bytes, key_hash: str) -> str:
    """The key whose owner's job callbacks are signed with: derived from the server's secret and
    the API key's hash (a new key gets a new one; nothing more to store). Its owner reads it at
    ``GET /callback-secret``."""
    return hmac.new(secret, b"sp2ot-callback:" + key_hash.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_body(secret: str, body: bytes) -> str:
    """The ``X-SP2OT-Signature`` header value of a callback: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
