"""The hot routes without the framework's per-request work: one parse, one validation, orjson out.

Profiling ``POST /v1/recommend`` showed more CPU in FastAPI's routing, dependency solving,
``json.loads`` + a second pass of validation and the response model's re-validation than in the
user tower. The hot endpoints are therefore plain ``async def endpoint(request) -> Response``
functions (`hot` marks them) that parse and validate the body in one pass
(`parse_body`: pydantic-core's JSON parser) and answer bytes built by orjson, and
`HotRouteMiddleware` dispatches an exact ``(method, path)`` match straight to them, skipping the
router. They stay ordinary routes of the app (OpenAPI, 405s, any request the middleware does not
claim), so both dispatchers run the same code, and errors get the app's answers
(`service.errors`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from service.errors import error_response
from service.metrics import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)
_HOT = "_shardrec_hot"


def hot(endpoint: Endpoint) -> Endpoint:
    """Mark ``endpoint`` (``async (request) -> Response``) for `HotRouteMiddleware`."""
    setattr(endpoint, _HOT, True)
    return endpoint


def json_response(payload: Any, status_code: int = 200) -> Response:
    """``payload`` as JSON bytes (orjson: no second validation, no ``jsonable_encoder``)."""
    return Response(orjson.dumps(payload), status_code, media_type="application/json")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``, parsed and validated in one pass.

    Raises:
        RequestValidationError: as FastAPI's own body parameter would (``loc`` starts with
            ``"body"``): no body, not JSON, invalid JSON, or invalid fields.
    """
    body = await request.body()
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    if not _is_json(request.headers.get("content-type", "")):
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields "
                    "from (send Content-Type: application/json)",
                    "input": None,
                }
            ]
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        for error in errors:
            error["loc"] = ("body", *error["loc"])
        raise RequestValidationError(errors) from None


def hot_routes(routers: Iterable[APIRouter]) -> dict[tuple[str, str], APIRoute]:
    """``(method, path) -> route`` of the routes of ``routers`` whose endpoint is `hot` (paths
    with the routers' prefixes; the app includes the routers without another prefix)."""
    found = {}
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and getattr(route.endpoint, _HOT, False):
                for method in route.methods:
                    found[(method, route.path)] = route
    return found


class HotRouteMiddleware:
    """ASGI middleware answering the `hot` routes of ``routers`` directly.

    Installed innermost among the user middleware: request ids, metrics (``scope["route"]`` is
    set, so requests count under the route's template), CORS and the body size limit still wrap
    it. ``hits`` counts the requests it answered.
    """

    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter]) -> None:
        self.app = app
        self.routes = hot_routes(routers)
        if not self.routes:
            raise ValueError(
                "HotRouteMiddleware got no @hot route; pass the routers that have them"
            )
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.routes.get((scope["method"], scope["path"]))
            if route is not None and not scope.get("root_path"):
                scope["route"] = route
                self.hits += 1
                request = Request(scope, receive)
                try:
                    response = await route.endpoint(request)
                except Exception as exc:
                    response = await error_response(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
