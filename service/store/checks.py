"""Argument checks shared by the history stores (one message per mistake, whatever the store)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence


def check_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str (the original id as a string), got {type(value).__name__} "
            f"{value!r}; convert with str(...)."
        )
    if not value or "\x00" in value:
        raise ValueError(f"{name} must be a non-empty string without NUL bytes, got {value!r}.")
    return value


def check_items(item_ids: object) -> list[str]:
    if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, Sequence):
        raise TypeError(
            f"item_ids must be a list of str item ids, got {type(item_ids).__name__} "
            f"{item_ids!r}; wrap a single id as [item_id]."
        )
    return [check_id(item, "item_ids[]") for item in item_ids]


def check_timestamp(ts: object) -> float:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise TypeError(f"timestamps must be unix seconds (float), got {type(ts).__name__} {ts!r}.")
    value = float(ts)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"timestamps must be finite unix seconds, got {ts!r}.")
    return value


def check_timestamps(timestamps: Sequence[float] | None, n: int) -> list[float]:
    if timestamps is None:
        now = time.time()
        return [now] * n
    if isinstance(timestamps, (str, bytes)) or not isinstance(timestamps, Sequence):
        raise TypeError(
            f"timestamps must be a list of {n} floats or None, got {type(timestamps).__name__}."
        )
    if len(timestamps) != n:
        raise ValueError(
            f"timestamps must hold one value per item: expected {n}, got {len(timestamps)}; "
            "pass None to use the current time."
        )
    return [check_timestamp(ts) for ts in timestamps]


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int >= 1, got {type(limit).__name__} {limit!r}.")
    if limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit}.")
    return limit


def group_rows(rows: Iterable[tuple[str, str, float]]) -> dict[str, list[tuple[str, float]]]:
    """Flat ``(user_id, item_id, timestamp)`` rows grouped per user, in order."""
    grouped: dict[str, list[tuple[str, float]]] = {}
    for pos, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 3:
            raise ValueError(
                f"rows[{pos}] must be a (user_id, item_id, timestamp) triple, got {row!r}."
            )
        user_id, item_id, ts = row
        grouped.setdefault(check_id(user_id, "user_id"), []).append((item_id, ts))
    return grouped


def prepare_seed(
    user_histories: Mapping[str, Iterable[tuple[str, float]]],
) -> list[tuple[str, list[tuple[str, float]]]]:
    """``(user_id, [(item_id, timestamp), ...] sorted by time (stable))`` per user, checked."""
    prepared: list[tuple[str, list[tuple[str, float]]]] = []
    for user_id, events in user_histories.items():
        user_id = check_id(user_id, "user_id")
        pairs = []
        for pos, event in enumerate(events):
            if not isinstance(event, (tuple, list)) or len(event) != 2:
                raise ValueError(
                    f"user_histories[{user_id!r}][{pos}] must be an (item_id, timestamp) "
                    f"pair, got {event!r}."
                )
            item, ts = event
            pairs.append((check_id(item, "item_id"), check_timestamp(ts)))
        pairs.sort(key=lambda pair: pair[1])
        prepared.append((user_id, pairs))
    return prepared
