"""The outermost layer of the API: a request id on every request, and one clean answer for an
unexpected exception.

:class:`RequestContext` (pure ASGI) gives each HTTP request an id (the client's
``X-Request-ID`` when it is a short token, else a new random one), puts it in
``request.state.request_id`` and in the ``X-Request-ID`` header of every response. An exception
no handler turned into an answer becomes one JSON 500 ``{"detail": ..., "request_id": ...}``
(an HTML page for a browser page) and one ERROR log line with the id, the exception and where
it was raised (the traceback at DEBUG). Nothing is re-raised to the server, so it keeps the
client's keep-alive connection open. When the response had already started (a stream that
broke half-way) no 500 can be sent any more: the response ends unfinished, which the client
sees as a truncated transfer, never as a complete file.
"""
from __future__ import annotations

import logging
import re
import traceback
import uuid
from typing import Awaitable, Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("sp2ot.api")

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a client's id is echoed only when it is a plain token

ErrorAnswer = Callable[[Request, str], Awaitable[Response]]


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


class RequestContext:
    """ASGI middleware: request id + unexpected exception -> ``answer(request, request_id)``."""

    def __init__(self, app: ASGIApp, answer: ErrorAnswer) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Request(scope).headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _CLIENT_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error("request %s: unhandled %s on %s %s at %s: %s", request_id, type(exc).__name__,
                      scope.get("method"), scope.get("path"), _where(exc), str(exc)[:300] or "-")
            log.debug("request %s: traceback", request_id, exc_info=exc)
            if started:
                return
            response = await self.answer(Request(scope, receive), request_id)
            await response(scope, receive, send_with_id)
