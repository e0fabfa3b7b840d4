"""Side information: user and item tables keyed by original id, and their encoding.

A loader either hands in tables (MovieLens' ``u.user`` / ``u.item``, the synthetic generator)
or gives feature columns per interaction row; ``*_table_from_rows`` turns those into tables (an
item takes its first row in the file, a user its latest interaction), and
``encode_user_table`` / ``with_item_table`` code the tables onto the vocabularies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from trainer.data.vocab import (
    IdIndex,
    ItemVocab,
    encode_bags,
    encode_categorical,
    id_keys,
    public_ids,
)


@dataclass
class UserTable:
    """Categorical user attributes keyed by original user id.

    ``columns`` maps a feature name to ``[len(keys)]`` string values ("" = unknown);
    ``vocab_order`` optionally fixes the order of a feature's values in its vocabulary.
    """

    keys: np.ndarray
    columns: dict[str, np.ndarray]
    vocab_order: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ItemTable:
    """Item side information keyed by original item id.

    Either ``tokens`` (``[len(keys)]`` strings of ``|``-separated tokens) or ``codes``
    (int64 ``[len(keys), max_tokens]`` into ``vocab``, padded with -1) gives the feature bags.
    """

    keys: np.ndarray
    titles: np.ndarray | None = None
    tokens: np.ndarray | None = None
    codes: np.ndarray | None = None
    vocab: list[str] | None = None


# --------------------------------------------------------------------------- from rows


def first_rows(item_codes: np.ndarray, num_items: int) -> np.ndarray:
    """int64 ``[num_items]``: the first row (file order) of each item code, -1 for none."""
    seen, first = np.unique(item_codes, return_index=True)
    out = np.full(num_items, -1, dtype=np.int64)
    out[seen] = first
    return out


def item_table_from_rows(
    columns: dict[str, np.ndarray], first_row: np.ndarray, keys: np.ndarray
) -> ItemTable:
    """Item tokens from ``|``-separated columns per interaction row.

    Args:
        columns: name -> ``[R]`` token strings, one per row.
        first_row: int64 ``[num_items]`` the row each item takes its tokens from; -1 gives none.
        keys: ``[num_items]`` the items' original id keys.

    Returns:
        An ``ItemTable`` of tokens; with several columns each token is named ``"name:token"``.
    """
    per_col = {
        name: np.where(first_row >= 0, np.asarray(v).astype(str)[np.maximum(first_row, 0)], "")
        for name, v in columns.items()
    }
    if len(per_col) == 1:
        return ItemTable(keys=keys, tokens=next(iter(per_col.values())))
    return ItemTable(keys=keys, tokens=_prefixed(per_col))


def _prefixed(per_col: dict[str, np.ndarray]) -> np.ndarray:
    """One token string per row joining every column's tokens as ``"name:token"``."""
    return np.array(
        [
            "|".join(
                f"{n}:{t.strip()}"
                for n, v in zip(per_col, vs)
                for t in str(v).split("|")
                if t.strip()
            )
            for vs in zip(*per_col.values())
        ]
    )


def user_table_from_rows(
    columns: dict[str, np.ndarray], latest_row: np.ndarray, keys: np.ndarray
) -> UserTable:
    """Each user's values of categorical columns per row, taken from the row ``latest_row``.

    Args:
        columns: name -> ``[R]`` values, one per interaction row.
        latest_row: int64 ``[num_users]`` the row of each user's latest interaction.
        keys: ``[num_users]`` the users' original id keys.
    """
    return UserTable(keys=keys, columns={n: np.asarray(v)[latest_row] for n, v in columns.items()})


# --------------------------------------------------------------------------- encoding


def encode_user_table(
    users: np.ndarray, table: UserTable | None
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Code a user table onto the user vocabulary.

    Args:
        users: ``[num_users]`` original id keys, in internal order.
        table: the attributes; rows of users not in ``users`` are ignored. None: no features.

    Returns:
        ``(features, vocab)``: name -> int64 ``[num_users]`` codes (0 = ``"<unk>"``, also for
        users missing from the table), and name -> value names.
    """
    if table is None:
        return {}, {}
    where = IdIndex(public_ids(users))(public_ids(id_keys(table.keys)))
    found = where >= 0
    features, vocab = {}, {}
    for name, values in table.columns.items():
        codes, vocab[name] = encode_categorical(
            np.asarray(values)[found], table.vocab_order.get(name)
        )
        features[name] = np.zeros(len(users), dtype=np.int64)
        features[name][where[found]] = codes
    return features, vocab


def with_item_table(vocab: ItemVocab, table: ItemTable, order: list[str] | None) -> ItemVocab:
    """A copy of ``vocab`` with the titles and feature bags of ``table``.

    Rows of items not in ``vocab`` are ignored; items missing from ``table`` get title ``""``
    and an empty bag. ``order`` leads the token vocabulary when ``table`` has tokens and no
    ``vocab`` of its own.
    """
    where = vocab.lookup(public_ids(id_keys(table.keys)))
    found = where >= 0
    out = dataclasses.replace(vocab)
    if table.titles is not None:
        out.titles = _titles(len(vocab), where, found, table.titles)
    bags = _bags(len(vocab), where, found, table, order)
    if bags is not None:
        out.features, out.feature_vocab = bags
    return out


def _titles(n: int, where: np.ndarray, found: np.ndarray, titles: np.ndarray) -> list[str]:
    out = [""] * n
    for i, t in zip(where[found].tolist(), np.asarray(titles)[found].tolist()):
        out[i] = str(t)
    return out


def _bags(
    n: int, where: np.ndarray, found: np.ndarray, table: ItemTable, order: list[str] | None
) -> tuple[np.ndarray, list[str]] | None:
    """int64 ``[n, max_tokens]`` bags per item (padded with -1) and the token names, or None."""
    if table.codes is not None:
        codes, names = np.asarray(table.codes, dtype=np.int64)[found], list(table.vocab or [])
    elif table.tokens is not None:
        codes, names = encode_bags(np.asarray(table.tokens)[found], table.vocab or order)
    else:
        return None
    feats = np.full((n, codes.shape[1]), -1, dtype=np.int64)
    feats[where[found]] = codes
    return feats, names
