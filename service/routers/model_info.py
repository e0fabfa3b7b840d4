"""``GET /v1/model``."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReaderDep, RecommenderDep
from service.schemas import ModelResponse

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[ReaderDep])


@router.get("/model", response_model=ModelResponse)
async def model_info(recommender: RecommenderDep) -> ModelResponse:
    """The serving model: manifest summary, index kind and parameters, measured recall."""
    return ModelResponse.model_validate(recommender.model.summary())
