"""``GET /v1/items/{item_id}/similar``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from starlette.concurrency import run_in_threadpool

from service.deps import ReaderDep, RecommenderDep, SettingsDep, check_limits
from service.queries import UnknownItemError
from service.schemas import HARD_MAX_LIST, ErrorResponse, ScoredItemOut, SimilarResponse, path_id

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[ReaderDep])

ItemIdPath = path_id("Item id.")


@router.get(
    "/{item_id}/similar",
    response_model=SimilarResponse,
    responses={404: {"model": ErrorResponse, "description": "Unknown item id."}},
)
async def similar(
    item_id: ItemIdPath,
    recommender: RecommenderDep,
    settings: SettingsDep,
    k: Annotated[int, Query(ge=1, le=HARD_MAX_LIST, description="Items (1..max_k).")] = 10,
) -> SimilarResponse:
    """Nearest items by output embedding (inner product w_i·w_j), the item itself excluded."""
    check_limits([(("query", "k"), k, settings.max_k, "max_k")])
    try:
        version, items = await run_in_threadpool(recommender.similar, item_id, k)
    except UnknownItemError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    return SimilarResponse(
        model_version=version, item_id=item_id, items=[ScoredItemOut.of(i) for i in items]
    )
