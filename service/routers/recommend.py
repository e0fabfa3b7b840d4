"""``POST /v1/recommend`` and ``POST /v1/recommend/batch``."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyStateDep, check_limits
from service.queries import UserQuery
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    RecommendRequest,
    RecommendResponse,
    recommend_limits,
)

router = APIRouter(prefix="/v1/recommend", tags=["recommend"])


def to_query(body: RecommendRequest) -> UserQuery:
    return UserQuery(
        history=body.history or (),
        k=body.k,
        user_id=body.user_id,
        features=body.user_features,
        exclude_history=body.exclude_history,
        exclude=body.exclude,
    )


@router.post("", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, state: ReadyStateDep) -> RecommendResponse:
    """Top-k items for a user id and/or an explicit history (popularity fallback without one).

    The user's stored history is used (followed by `history`), and its features from the
    model unless `user_features` are given. Unknown item ids are ignored and listed.
    """
    settings = state.settings
    check_limits(recommend_limits(body, ("body",), settings.max_k, settings.max_history))
    [answer] = await state.recommend([to_query(body)])
    return RecommendResponse.of(body.user_id, answer)


@router.post("/batch", response_model=BatchRecommendResponse)
async def recommend_batch(
    body: BatchRecommendRequest, state: ReadyStateDep
) -> BatchRecommendResponse:
    """Many users in one call (at most max_batch), encoded and searched in one batch."""
    settings = state.settings
    limits = [(("body", "requests"), len(body.requests), settings.max_batch, "max_batch")]
    for i, request in enumerate(body.requests):
        limits += recommend_limits(
            request, ("body", "requests", i), settings.max_k, settings.max_history
        )
    check_limits(limits)
    answers = await state.recommend([to_query(r) for r in body.requests])
    results = [RecommendResponse.of(r.user_id, a) for r, a in zip(body.requests, answers)]
    return BatchRecommendResponse(model_version=answers[0].model_version, results=results)
