"""Request and response bodies of the HTTP API (pydantic), separate per direction.

Limits that depend on the settings (``max_k``, ``max_history``, ``max_batch``) are checked by
`limit_errors` in the routes and reported exactly like pydantic's own validation errors (422,
with the field and the reason); the static bounds below are the hard ceilings of the settings.
Item and user ids are strings as in the original data; JSON numbers are accepted and turned
into strings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from service.queries import Recommendation, ScoredItem

MAX_ID_CHARS = 256
HARD_MAX_LIST = 100_000  # the largest max_k / max_history / max_batch the settings accept
MAX_FEATURES = 64
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def path_id(description: str) -> Any:
    """A path parameter holding an id (same constraints as `Id`)."""
    return Annotated[
        str,
        Path(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN, description=description),
    ]


Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN),
    AfterValidator(_utf8),
]
FeatureValue = Annotated[
    str, StringConstraints(max_length=MAX_ID_CHARS, pattern=r"^[^\x00]*$"), AfterValidator(_utf8)
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- requests


class RecommendRequest(_Request):
    """A user id and/or an explicit watch history (original item ids, most recent last)."""

    user_id: Id | None = Field(
        None, description="Known user: its stored history and features are used."
    )
    history: list[Id] | None = Field(
        None,
        max_length=HARD_MAX_LIST,
        description="Watched item ids, most recent last; appended after the stored history of "
        "user_id. At most max_history items. Unknown ids are ignored and listed.",
    )
    user_features: dict[Id, FeatureValue] | None = Field(
        None,
        max_length=MAX_FEATURES,
        description="User feature name -> value (e.g. {'age': '25-34'}); overrides the user's "
        "stored features; unknown values count as unknown (code 0).",
    )
    k: int = Field(10, ge=1, le=HARD_MAX_LIST, description="Items to return (1..max_k).")
    exclude_history: bool = Field(True, description="Never recommend an item of the history.")
    exclude: list[Id] = Field(
        default_factory=list,
        max_length=HARD_MAX_LIST,
        description="Item ids never to recommend (at most max_history).",
    )

    @model_validator(mode="after")
    def _user_or_history(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError(
                "give user_id, history, or both (an empty history asks for popular items)"
            )
        return self


class BatchRecommendRequest(_Request):
    """Several recommendation requests answered in one encoder batch."""

    requests: list[RecommendRequest] = Field(
        min_length=1, max_length=HARD_MAX_LIST, description="At most max_batch requests."
    )


class EventsRequest(_Request):
    """Watches to append to a user's history, in order (oldest first)."""

    items: list[Id] = Field(
        min_length=1,
        max_length=HARD_MAX_LIST,
        description="Watched item ids (at most max_history).",
    )
    timestamps: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="Unix seconds, one per item; default now."
    )

    @model_validator(mode="after")
    def _one_timestamp_per_item(self) -> EventsRequest:
        if self.timestamps is not None and len(self.timestamps) != len(self.items):
            raise ValueError(
                f"timestamps must hold one value per item: {len(self.items)} items, "
                f"{len(self.timestamps)} timestamps"
            )
        return self


class ReloadRequest(_Request):
    """The artifact directory of the model to serve."""

    artifacts: Annotated[
        str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    ] = Field(description="Path of an artifact directory on the server.")


# ---------------------------------------------------------------------- responses


class ScoredItemOut(_Response):
    item_id: str
    score: float = Field(description="u·w+b (model), w·w (similar) or popularity count.")
    title: str | None = None

    @classmethod
    def of(cls, item: ScoredItem) -> ScoredItemOut:
        # Trusted values built by the model: no validation on the hot path.
        return cls.model_construct(item_id=item.item_id, score=item.score, title=item.title)


class RecommendResponse(_Response):
    model_version: str
    user_id: str | None
    source: Literal["model", "popularity"] = Field(
        description="'popularity': no known history item, most popular items returned."
    )
    items: list[ScoredItemOut]
    history_length: int = Field(description="Known history items fed to the user tower.")
    unknown_items: list[str] = Field(description="Ignored ids (history and exclusions).")
    ignored_features: list[str] = Field(description="Ignored feature names.")

    @classmethod
    def of(cls, user_id: str | None, rec: Recommendation) -> RecommendResponse:
        return cls.model_construct(
            model_version=rec.model_version,
            user_id=user_id,
            source=rec.source,
            items=[ScoredItemOut.of(i) for i in rec.items],
            history_length=rec.history_length,
            unknown_items=rec.unknown_items,
            ignored_features=rec.ignored_features,
        )


class BatchRecommendResponse(_Response):
    model_version: str
    results: list[RecommendResponse]


class SimilarResponse(_Response):
    model_version: str
    item_id: str
    items: list[ScoredItemOut]


class EventsResponse(_Response):
    user_id: str
    appended: int
    history_length: int = Field(description="Stored events of the user after the append.")
    unknown_items: list[str] = Field(description="Stored, but unknown to the serving model.")
    model_version: str


class HistoryResponse(_Response):
    user_id: str
    items: list[str] = Field(description="Most recent stored items, most recent last.")
    length: int = Field(description="All stored events of the user.")


class RecallOut(_Response):
    recall: float
    k: int
    num_queries: int


class IndexOut(_Response):
    kind: str
    params: dict[str, Any]
    source: Literal["loaded", "built"]
    path: str | None
    seconds: float
    recall: RecallOut | None


class ModelResponse(_Response):
    model_version: str
    created: str | None
    artifacts: str
    name: str | None
    num_items: int
    num_users: int
    embedding_dim: int
    max_history: int
    tower: Literal["mean", "sequence"] = Field(
        description="User tower: mean pooling (YouTube-DNN) or causal self-attention."
    )
    holdout: Literal["test", "valid", "none"] = Field(
        description="What training held out: test (test metrics below), valid, none (refit)."
    )
    user_features: list[str]
    metrics: dict[str, Any]
    loaded_at: float
    index: IndexOut


class ReloadResponse(_Response):
    model_version: str
    previous_version: str
    seconds: float
    seeded_events: int
    index: IndexOut


class HealthResponse(_Response):
    status: Literal["ok"]


class ReadyResponse(_Response):
    status: Literal["ready", "loading", "failed"]
    model_version: str | None = None
    detail: str | None = None


class ErrorResponse(_Response):
    detail: Any


# ---------------------------------------------------------------------- limits


def limit_errors(
    values: list[tuple[tuple[str | int, ...], int, int, str]],
) -> list[dict[str, Any]]:
    """Pydantic-style errors for ``(loc, value, maximum, setting)`` where ``value > maximum``."""
    errors = []
    for loc, value, maximum, setting in values:
        if value > maximum:
            errors.append(
                {
                    "type": "less_than_equal" if setting == "max_k" else "too_long",
                    "loc": loc,
                    "msg": f"must be at most {maximum} (the service's {setting}), got {value}",
                    "input": value,
                }
            )
    return errors


def recommend_limits(
    body: RecommendRequest, loc: tuple[str | int, ...], max_k: int, max_history: int
) -> list[tuple[tuple[str | int, ...], int, int, str]]:
    """The settings-dependent limits of one `RecommendRequest` (see `limit_errors`)."""
    return [
        ((*loc, "k"), body.k, max_k, "max_k"),
        ((*loc, "history"), len(body.history or ()), max_history, "max_history"),
        ((*loc, "exclude"), len(body.exclude), max_history, "max_history"),
    ]
