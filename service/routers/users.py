"""``POST /v1/users/{user_id}/events`` and ``GET /v1/users/{user_id}/history``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from service.deps import ReaderDep, RecommenderDep, SettingsDep, WriterDep, check_limits
from service.schemas import (
    HARD_MAX_LIST,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    path_id,
)

router = APIRouter(prefix="/v1/users", tags=["users"])

UserIdPath = path_id("User id.")
CREDENTIAL_ERRORS: dict[int | str, dict] = {
    401: {"model": ErrorResponse, "description": "Missing API key."},
    403: {"model": ErrorResponse, "description": "Wrong API key, or event writes disabled."},
}


@router.post(
    "/{user_id}/events",
    response_model=EventsResponse,
    dependencies=[WriterDep],
    responses=CREDENTIAL_ERRORS,
)
async def append_events(
    user_id: UserIdPath, body: EventsRequest, recommender: RecommenderDep, settings: SettingsDep
) -> EventsResponse:
    """Append watches to the user's history; the next recommendation, from any process of the
    deployment, uses them. Needs an API key (`Authorization: Bearer <key>`).

    The events are durable when the response is sent (SQLite WAL fsynced, or Redis's AOF).
    """
    check_limits([(("body", "items"), len(body.items), settings.max_history, "max_history")])
    result = await run_in_threadpool(
        recommender.append_events, user_id, body.items, body.timestamps
    )
    return EventsResponse(
        user_id=result.user_id,
        appended=result.appended,
        history_length=result.history_length,
        unknown_items=result.unknown_items,
        model_version=result.model_version,
    )


@router.get(
    "/{user_id}/history",
    response_model=HistoryResponse,
    dependencies=[ReaderDep],
    responses=CREDENTIAL_ERRORS,
)
async def history(
    user_id: UserIdPath,
    recommender: RecommenderDep,
    limit: Annotated[int, Query(ge=1, le=HARD_MAX_LIST, description="Most recent items.")] = 100,
) -> HistoryResponse:
    """The user's stored history (most recent last)."""
    items, length = await run_in_threadpool(recommender.history, user_id, limit)
    return HistoryResponse(user_id=user_id, items=items, length=length)
