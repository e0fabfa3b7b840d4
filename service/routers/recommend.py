"""``POST /v1/recommend`` and ``POST /v1/recommend/batch``: the hot routes (`service.hotpath`).

Each parses and validates its body once, checks the settings' limits, hands the queries to the
micro-batcher and answers orjson bytes built straight from the `Recommendation` objects (no
response model re-validation). The request and response models still document them in OpenAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.deps import bearer_credentials, check_api_key, check_limits, get_ready_state
from service.hotpath import hot, json_response, parse_body
from service.queries import Recommendation, UserQuery
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    RecommendRequest,
    RecommendResponse,
    recommend_limits,
)
from service.state import ServiceState

router = APIRouter(prefix="/v1/recommend", tags=["recommend"])


def _body_doc(model: type) -> dict[str, Any]:
    """OpenAPI of a body the endpoint parses itself (the schema is added by `service.app`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
        "security": [{}, {"ApiKey": []}],  # an API key only with SHARDREC_AUTH_READS
    }


REQUEST_MODELS = (RecommendRequest, BatchRecommendRequest)


def to_query(body: RecommendRequest) -> UserQuery:
    return UserQuery(
        history=body.history or (),
        k=body.k,
        user_id=body.user_id,
        features=body.user_features,
        exclude_history=body.exclude_history,
        exclude=body.exclude,
    )


def answer(user_id: str | None, rec: Recommendation) -> dict[str, Any]:
    """The `RecommendResponse` of ``rec`` as a plain dict (field order of the model)."""
    return {
        "model_version": rec.model_version,
        "user_id": user_id,
        "source": rec.source,
        "items": [{"item_id": i.item_id, "score": i.score, "title": i.title} for i in rec.items],
        "history_length": rec.history_length,
        "unknown_items": rec.unknown_items,
        "ignored_features": rec.ignored_features,
    }


async def _ready(request: Request) -> ServiceState:
    """The loaded state (503 before), after the read credential when ``auth_reads`` is on."""
    state = await get_ready_state(request)
    if state.settings.auth_reads:
        check_api_key(state.settings, bearer_credentials(request), "reads")
    return state


@router.post("", response_model=RecommendResponse, openapi_extra=_body_doc(RecommendRequest))
@hot
async def recommend(request: Request) -> Response:
    """Top-k items for a user id and/or an explicit history (popularity fallback without one).

    Body: `RecommendRequest`. The user's stored history is used (followed by `history`), and
    its features from the model unless `user_features` are given. Unknown item ids are ignored
    and listed.
    """
    state = await _ready(request)
    body = await parse_body(request, RecommendRequest)
    settings = state.settings
    check_limits(recommend_limits(body, ("body",), settings.max_k, settings.max_history))
    [rec] = await state.recommend([to_query(body)])
    return json_response(answer(body.user_id, rec))


@router.post(
    "/batch",
    response_model=BatchRecommendResponse,
    openapi_extra=_body_doc(BatchRecommendRequest),
)
@hot
async def recommend_batch(request: Request) -> Response:
    """Many users in one call (at most max_batch), encoded and searched in one batch.

    Body: `BatchRecommendRequest`.
    """
    state = await _ready(request)
    body = await parse_body(request, BatchRecommendRequest)
    settings = state.settings
    limits = [(("body", "requests"), len(body.requests), settings.max_batch, "max_batch")]
    for i, r in enumerate(body.requests):
        limits += recommend_limits(r, ("body", "requests", i), settings.max_k, settings.max_history)
    check_limits(limits)
    recs = await state.recommend([to_query(r) for r in body.requests])
    results = [answer(r.user_id, rec) for r, rec in zip(body.requests, recs)]
    return json_response({"model_version": recs[0].model_version, "results": results})
