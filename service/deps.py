"""Dependencies of the routes, as ``Annotated`` aliases.

They are ``async`` on purpose: FastAPI runs a plain ``def`` dependency on the thread pool, a
thread hop per dependency per request for what is an attribute read.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.recommender import Recommender
from service.schemas import limit_errors
from service.settings import ServiceSettings
from service.state import ServiceState

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The admin token (SHARDREC_ADMIN_TOKEN) as `Authorization: Bearer <token>`.",
)
_api_key = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (SHARDREC_API_KEYS) as `Authorization: Bearer <key>`: needed by "
    "event writes, and by reads when SHARDREC_AUTH_READS is true.",
)


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> ServiceSettings:
    return state.settings


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]


async def get_ready_state(request: Request) -> ServiceState:
    """The state once a model is loaded, else 503 (loading, or why the load failed)."""
    state: ServiceState = request.app.state.service
    if state.recommender is None:
        detail = (
            f"model not loaded: {state.error}"
            if state.status == "failed"
            else "the model is still loading; retry shortly (see /readyz)"
        )
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail, {"Retry-After": "1"})
    return state


# One dependency (no sub-dependency) for the hot recommendation routes: each level of
# dependency solving costs FastAPI tens of microseconds per request.
ReadyStateDep = Annotated[ServiceState, Depends(get_ready_state)]


async def get_recommender(state: ReadyStateDep) -> Recommender:
    """The recommender (503 while no model is loaded)."""
    assert state.recommender is not None
    return state.recommender


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one or when admin routes are disabled."""
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin routes are disabled: set SHARDREC_ADMIN_TOKEN to enable them",
        )
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin token: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        logger.warning("admin request with a wrong token refused")
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")


AdminDep = Depends(require_admin)


def bearer_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    """The ``Authorization: Bearer <credentials>`` of ``request`` (None without one), as
    ``HTTPBearer(auto_error=False)`` reads it, for endpoints without dependencies."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())


def check_api_key(
    settings: ServiceSettings, credentials: HTTPAuthorizationCredentials | None, what: str
) -> None:
    """401 without a key, 403 with a wrong one (or the admin token) or while none is set."""
    keys = settings.api_key_set()
    if not keys:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"{what} are disabled: set SHARDREC_API_KEYS to enable them",
        )
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"missing API key: {what} need 'Authorization: Bearer <key>' with a key of "
            "SHARDREC_API_KEYS",
            {"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode()
    # Compare with every key (no early exit: the time does not tell which key is close).
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    if not found:
        logger.warning("%s with a wrong API key refused", what)
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong API key")


async def require_writer(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)],
) -> None:
    """An API key for event writes."""
    check_api_key(settings, credentials, "event writes")


async def require_reader(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)],
) -> None:
    """An API key for reads when ``auth_reads`` is on; nothing otherwise."""
    if settings.auth_reads:
        check_api_key(settings, credentials, "reads")


WriterDep = Depends(require_writer)
ReaderDep = Depends(require_reader)


def check_limits(limits: list) -> None:
    """Raise a 422 `RequestValidationError` for limits exceeded (see `schemas.limit_errors`)."""
    errors = limit_errors(limits)
    if errors:
        raise RequestValidationError(errors)
