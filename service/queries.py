"""The query and result types of a served model (`UserQuery` in, `Recommendation` out).

Ids are as in the original data (strings). Plain dataclasses: the HTTP schemas
(`service.schemas`) convert to and from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

Source = Literal["model", "popularity"]
SearchObserver = Callable[[str, float], None]  # (index kind, seconds)


class UnknownItemError(LookupError):
    """An item id that is not in the served model's catalogue."""


@dataclasses.dataclass(frozen=True)
class UserQuery:
    """One recommendation request, ids as in the original data.

    Attributes:
        history: watched item ids, most recent last (a user's stored history followed by any
            explicit one). Ids unknown to the model are ignored and reported.
        k: number of items wanted, ``>= 1``.
        user_id: the user; its categorical features come from the artifacts unless given.
        features: user feature name -> raw value, mapped through the model's vocabulary
            (unknown values -> code 0, "<unk>"); names the model lacks are ignored and reported.
        exclude_history: never recommend an item of ``history``.
        exclude: item ids never to recommend.
    """

    history: Sequence[str] = ()
    k: int = 10
    user_id: str | None = None
    features: Mapping[str, str] | None = None
    exclude_history: bool = True
    exclude: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    """A returned item: original id, score, and title (None when unknown)."""

    item_id: str
    score: float
    title: str | None


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The answer to one `UserQuery`.

    Attributes:
        model_version: the model that answered.
        source: ``"model"`` (user tower + index) or ``"popularity"`` (no known history).
        items: at most ``k`` items, best first.
        history_length: known history items fed to the user tower (after truncation).
        unknown_items: ids of the history and exclusions the model does not know (ignored).
        ignored_features: feature names the model does not have (ignored).
    """

    model_version: str
    source: Source
    items: list[ScoredItem]
    history_length: int
    unknown_items: list[str]
    ignored_features: list[str]
