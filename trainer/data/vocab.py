"""Vocabularies: original ids to rows (``IdIndex``), the item vocabulary, feature codes.

Original ids are int64 when every id of a source is an integer and str otherwise
(``id_keys``); they are exposed as int64 or object-str arrays (``public_ids``). Categorical
features are coded with 0 = ``"<unk>"``; feature bags are padded with -1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

UNK = "<unk>"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def id_keys(ids: object) -> np.ndarray:
    """The comparable form of ids: int64 stays int64; anything else is compared as str."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64, copy=False)
    return ids.astype(str)


def public_ids(keys: np.ndarray) -> np.ndarray:
    """The dtype ids are exposed with: int64, or object str."""
    if keys.dtype.kind in "iu":
        return keys.astype(np.int64, copy=False)
    return keys.astype(object)


class IdIndex:
    """Maps original ids (ints or strings) to their row in ``original_ids``; -1 when unknown.

    Integer vocabularies accept ints, integral floats and numeric strings (``"50"`` finds 50);
    string vocabularies compare ``str(x)`` (so ``50`` finds ``"50"``).
    """

    def __init__(self, original_ids: np.ndarray) -> None:
        self.is_int = original_ids.dtype.kind in "iu"
        keys = original_ids.astype(np.int64) if self.is_int else original_ids.astype(str)
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]

    def __call__(self, query: object) -> np.ndarray:
        """int64 rows, the shape of ``query`` (a sequence, array or tensor of ids)."""
        if isinstance(query, torch.Tensor):
            query = query.detach().cpu().numpy()
        arr = np.asarray(query)
        flat = arr.reshape(-1)
        if self.is_int:
            keys, ok = _as_int_keys(flat)
        else:
            keys, ok = flat.astype(str), np.ones(flat.shape, dtype=bool)
        out = np.full(flat.shape, -1, dtype=np.int64)
        if len(self._sorted) and flat.size:
            where = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
            hit = ok & (self._sorted[where] == keys)
            out[hit] = self._order[where[hit]]
        return out.reshape(arr.shape)


def _as_int_keys(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 keys for a query against an integer vocabulary, and which entries were valid."""
    if flat.dtype.kind in "iu":
        return flat.astype(np.int64), np.ones(flat.shape, dtype=bool)
    if flat.dtype.kind == "f":
        ok = np.isfinite(flat) & (np.floor(flat) == flat)
        return np.where(ok, flat, 0).astype(np.int64), ok
    parsed = [_parse_int(x) for x in flat.tolist()]
    ok = np.array([p is not None for p in parsed], dtype=bool)
    keys = np.array([0 if p is None else p for p in parsed], dtype=np.int64)
    return keys, ok


def _parse_int(x: object) -> int | None:
    """``x`` as an int64 id, or None (bools, fractional floats, non-numbers, out of range)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, bytes):
        x = x.decode("utf-8", "replace")
    if isinstance(x, float) and not x.is_integer():
        return None
    try:
        value = int(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if _INT64_MIN <= value <= _INT64_MAX else None


@dataclass(eq=False)
class ItemVocab:
    """Items in internal order (0 = most frequent training target).

    Attributes:
        original_ids: ``[num_items]`` int64 when every id in the source is an integer, else an
            object array of str.
        popularity: int64 ``[num_items]``, how often each item is a training target.
        titles: ``num_items`` titles, or None when the source has none.
        features: int64 ``[num_items, max_tokens]`` token ids into ``feature_vocab`` (a bag per
            item, e.g. its genres), padded with -1; None when the source has none.
        feature_vocab: the token names, or None.
    """

    original_ids: np.ndarray
    popularity: np.ndarray
    titles: list[str] | None = None
    features: np.ndarray | None = None
    feature_vocab: list[str] | None = None

    def __len__(self) -> int:
        return len(self.original_ids)

    @functools.cached_property
    def _index(self) -> IdIndex:
        return IdIndex(self.original_ids)

    def lookup(self, original_ids: Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
        """int64 internal indices (same shape as the input); -1 for ids not in the vocabulary."""
        return self._index(original_ids)


def encode_categorical(values: np.ndarray, order: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Categorical values -> codes and their vocabulary.

    Args:
        values: ``[n]`` values (compared as str); ``""`` is unknown.
        order: names that lead the vocabulary in this order (the rest follow sorted).

    Returns:
        ``(codes, vocab)``: int64 ``[n]`` codes, 0 for unknown; ``vocab[0]`` is ``"<unk>"``.
    """
    values = np.asarray(values).astype(str)
    present = np.unique(values[values != ""])
    vocab = [UNK]
    if order is not None:
        vocab += list(order)
    known = set(vocab)
    vocab += [v for v in present.tolist() if v not in known]
    table = {v: i for i, v in enumerate(vocab)}
    table[UNK] = 0
    uniq, inverse = np.unique(values, return_inverse=True)
    uniq_codes = np.array([0 if u == "" else table[u] for u in uniq.tolist()], dtype=np.int64)
    return uniq_codes[inverse.reshape(-1)], vocab


def encode_bags(tokens: np.ndarray, order: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Token strings ``"a|b"`` -> a padded bag of token ids per row, and the token vocabulary.

    Args:
        tokens: ``[n]`` strings of ``|``-separated tokens (blank tokens and repeats dropped).
        order: the leading tokens of the vocabulary in this order (the rest follow sorted).

    Returns:
        ``(bags, vocab)``: int64 ``[n, max(1, max_tokens)]`` ids into ``vocab``, padded with -1.
    """
    bags = [_tokens(s) for s in tokens.tolist()]
    vocab = list(order) if order is not None else []
    known = set(vocab)
    vocab += sorted({t for bag in bags for t in bag} - known)
    table = {t: i for i, t in enumerate(vocab)}
    width = max((len(b) for b in bags), default=0)
    out = np.full((len(bags), max(width, 1)), -1, dtype=np.int64)
    for i, bag in enumerate(bags):
        out[i, : len(bag)] = [table[t] for t in bag]
    return out, vocab


def _tokens(s: object) -> list[str]:
    """The distinct non-blank tokens of ``"a| b|a"`` in first-seen order: ``["a", "b"]``."""
    return list(dict.fromkeys(t.strip() for t in str(s).split("|") if t.strip()))
