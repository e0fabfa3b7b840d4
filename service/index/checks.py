"""Argument checks of the index (ints, query and item matrices, exclusion lists) and the
exclusion mask; numpy only. Errors name what was expected, what came, and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}."
        )
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
    return int(value)


def matrix_dim(x: object) -> int:
    """``d`` of an item matrix ``[N, d]``."""
    shape = np.shape(x)
    if len(shape) != 2:
        raise ValueError(
            f"item_vectors must be a 2-D array [N, d], got shape {shape}; pass the item "
            "weight matrix (one row per item)."
        )
    return int(shape[1])


def check_matrix(x: object, name: str, dim: int, what: str) -> np.ndarray:
    """``x`` as C-contiguous float32 ``[n, dim]``, or ValueError/TypeError with the fix."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(
            f"{name} must be a real-valued array (float32), got dtype {arr.dtype}; pass {what} "
            "as a numpy float32 array."
        )
    if arr.ndim != 2 or arr.shape[1] != dim:
        hint = " (one query: use x[None, :])" if arr.ndim == 1 else ""
        raise ValueError(
            f"{name} must have shape [n, {dim}], got {arr.shape}{hint}; pass {what} of the "
            f"index dimension {dim}."
        )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0][0])
        raise ValueError(
            f"{name} must be finite, got NaN/inf (first in row {bad}, or a value beyond the "
            "float32 range); fix or drop those rows."
        )
    return out


def check_exclude(
    exclude: Sequence[Iterable[int]] | None, n: int, ntotal: int
) -> list[np.ndarray] | None:
    """Per-query sorted unique int64 ids within ``0 .. ntotal-1``; None when nothing excluded."""
    if exclude is None:
        return None
    if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        rows: list[Any] = list(exclude)
    elif isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence):
        raise TypeError(
            f"exclude must be a sequence of {n} id lists (one per query) or None, got "
            f"{type(exclude).__name__}."
        )
    else:
        rows = list(exclude)
    if len(rows) != n:
        raise ValueError(
            f"exclude must hold one id list per query: expected {n}, got {len(rows)}; pass "
            "[[]] * n for queries without exclusions."
        )
    out = []
    for i, row in enumerate(rows):
        arr = np.asarray(list(row) if not isinstance(row, np.ndarray) else row)
        if arr.size == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"exclude[{i}] must be a flat list of integer item ids, got dtype {arr.dtype} "
                f"shape {arr.shape}; map item ids to index rows first."
            )
        arr = np.unique(arr.astype(np.int64))
        out.append(arr[(arr >= 0) & (arr < ntotal)])
    return out if any(e.size for e in out) else None


def excluded_mask(candidates: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """bool ``[n, m]``: whether ``candidates[r, j]`` is in ``excluded[r]`` (one `np.isin` for all
    rows, on keys ``r * (max id + 2) + id``)."""
    n = candidates.shape[0]
    sizes = np.array([e.size for e in excluded], dtype=np.int64)
    if not sizes.any():
        return np.zeros(candidates.shape, dtype=bool)
    span = int(max(candidates.max(initial=0), max(int(e.max(initial=0)) for e in excluded))) + 2
    offsets = np.arange(n, dtype=np.int64) * span
    excluded_keys = np.concatenate(excluded) + np.repeat(offsets, sizes)
    return np.isin(candidates + offsets[:, None], excluded_keys)
