"""Request ids: ``X-Request-ID`` taken from the request (or a new one), in the logs and the response.

`RequestIdMiddleware` (plain ASGI) keeps a well-formed incoming ``X-Request-ID`` (at most
`MAX_CHARS` characters of ``[A-Za-z0-9._:-]``; anything else is replaced, so a client cannot
inject text into the logs) or makes a new one, sets it in a context variable for the rest of the
request, and adds it to the response headers. `RequestIdFilter` puts it on every log record as
``%(request_id)s`` (``-`` outside a request); `LOG_FORMAT` shows it. uvicorn's access log line is
written while the response starts, inside the request's context, so it carries the id too.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from service.metrics import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
MAX_CHARS = 128
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_VALID = re.compile(rb"[A-Za-z0-9._:\-]{1,%d}" % MAX_CHARS)

_current: contextvars.ContextVar[str] = contextvars.ContextVar("shardrec_request_id", default="-")


def current_request_id() -> str:
    """The id of the request being handled (``-`` outside one)."""
    return _current.get()


def request_id_of(scope: Scope) -> str:
    """The request's well-formed ``X-Request-ID``, else a new one (32 hex digits)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            if _VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: the request id in a context variable and the ``X-Request-ID`` answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = _current.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, ``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True


def setup_logging(level: str) -> None:
    """Root logging to stderr with `LOG_FORMAT` (request ids on every line)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_shardrec", False)]:
        root.removeHandler(old)
    handler._shardrec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
