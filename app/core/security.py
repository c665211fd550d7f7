"""API keys: generation and hashing; the caller's identity (:class:`Owner`).

A key is 32 random bytes (``sp2ot_`` + urlsafe base64). Only its sha256 is stored: with
that much entropy a plain hash is as safe as a slow password hash and lets a request be
authenticated with one indexed lookup.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

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
