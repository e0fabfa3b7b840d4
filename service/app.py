"""The FastAPI application: ``create_app(settings)``.

Assembly only: the lifespan starts and stops the `ServiceState` (the model loads in the
background), routers are included per resource, and error handlers (`service.errors`) make every
refusal a clear 4xx (validation 422 with the field and reason, credentials 401/403, oversized
bodies 413) and log it; an unexpected error is logged with its traceback and answered 500
without details.

Middleware, outermost first: request ids (`service.requestid`), Prometheus metrics, CORS (only
when ``cors_origins`` is set), the body size limit, and the hot-route dispatcher
(`service.hotpath`). FastAPI's own OpenTelemetry hooks are off (the service has its metrics).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import http_error, unexpected_error, validation_error
from service.hotpath import HotRouteMiddleware
from service.limits import BodySizeLimitMiddleware
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.requestid import RequestIdMiddleware, setup_logging
from service.routers import admin, health, items, model_info, recommend, users
from service.settings import ServiceSettings
from service.state import ModelFactory, ServiceState, default_model_factory

logger = logging.getLogger(__name__)

API_VERSION = "1"


def create_app(
    settings: ServiceSettings,
    *,
    metrics: ServiceMetrics | None = None,
    model_factory: ModelFactory = default_model_factory,
) -> FastAPI:
    """The recommendation service for ``settings`` (nothing is loaded until the lifespan runs).

    Args:
        settings: validated settings.
        metrics: the Prometheus registry holder; a new one by default.
        model_factory: ``(settings, artifacts, index_dir) -> Model``; the default loads and
            verifies the artifacts and loads or builds the index.
    """
    metrics = metrics if metrics is not None else ServiceMetrics()
    state = ServiceState(settings, metrics, model_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()
            metrics.process_exited()

    app = FastAPI(
        title="shardrec",
        summary="YouTube-DNN candidate generation: user tower + FAISS retrieval.",
        version=API_VERSION,
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = state
    app.add_middleware(HotRouteMiddleware, routers=[recommend.router])
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics, skip_routes=("/metrics",))
    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    for module in (recommend, items, users, model_info, admin, health):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the schemas of the bodies the hot routes parse themselves."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        _, defs = models_json_schema(
            [(m, "validation") for m in recommend.REQUEST_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


def create_app_from_env() -> FastAPI:
    """`create_app` with settings from the ``SHARDREC_*`` environment (uvicorn workers, which
    do not inherit the parent's logging set-up)."""
    settings = ServiceSettings()  # type: ignore[call-arg]
    setup_logging(settings.log_level)
    return create_app(settings)
