"""Errors that become JSON answers ``{"detail": "..."}``."""
from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status and a message telling the client what to fix."""

    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers


class UploadRejected(ApiError):
    status_code = 422


class UploadTooLarge(ApiError):
    status_code = 413


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
