"""``GET /healthz``, ``GET /readyz`` and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Model loading or failed."}},
)
async def readyz(state: StateDep) -> ReadyResponse | JSONResponse:
    """Readiness: 200 once a model is loaded, 503 before (or if loading failed)."""
    if state.recommender is None:
        body = ReadyResponse(status=state.status, detail=state.error)
        return JSONResponse(body.model_dump(), status_code=503)
    return ReadyResponse(
        status="ready",
        model_version=state.recommender.model.model_version,
        detail=state.follow_error and f"could not move to the published {state.follow_error}",
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus metrics (request counts and latency by route and status, model version)."""
    body, content_type = state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
