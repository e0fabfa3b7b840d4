"""The answers to refused and failed requests, one place for every dispatcher.

`error_response(request, exc)` turns a `RequestValidationError` into a 422 naming each field and
reason, an ``HTTPException`` into its status and detail, anything else into a 500 without
details (logged with its traceback); every refusal is logged. The app registers these as its
exception handlers, and the hot-route dispatcher (`service.hotpath`) calls them directly.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("service.app")


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """``{"loc", "msg", "type"}`` of each pydantic-style error."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = validation_details(exc.errors())
    logger.info(
        "422 %s %s: %s",
        request.method,
        request.url.path,
        "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
    )
    return JSONResponse({"detail": errors}, status_code=422)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    logger.log(level, "%d %s %s: %s", exc.status_code, request.method, request.url.path, detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error(
        "500 %s %s: unexpected %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc_info=exc,
    )
    return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The answer to ``exc`` raised while handling ``request``."""
    if isinstance(exc, RequestValidationError):
        return await validation_error(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await http_error(request, exc)
    return await unexpected_error(request, exc)
