"""``build_dataset``: raw interaction rows -> ``Dataset``, as a pipeline of named steps.

Every source (synthetic, MovieLens, an interactions file) ends here. The steps:

1. ``interaction_rows``: check the rows (one user, item and timestamp each, at least one);
2. ``unique_codes`` and ``remove_short_users``: users indexed by original id (ascending);
   users with fewer than 2 interactions fail or, when asked, are dropped with their rows;
3. ``group_by_user``: each user's interactions sorted by time with a stable sort, so
   interactions with equal timestamps keep their file order;
4. ``split_positions`` (leave-last-out): the last interaction is the test target, the one
   before it the validation target, and every earlier interaction that has at least one
   interaction before it is a training target. A user with exactly 2 gives a test example only.
   With ``holdout="valid"`` the last interaction is the validation target and there is no test;
   with ``holdout="none"`` every interaction after a user's first is a training target;
5. ``index_items`` and ``order_items``: items re-indexed by descending frequency among the
   *training targets* (``seq.items[train_positions]``), ties by original id ascending; items
   that are never a training target (seen only as a first interaction, in validation or in
   test, or only in the catalogue) come last, by their count over all interactions, then by id.
   Item 0 is the most popular, which is what log-uniform (Zipfian) candidate samplers assume;
6. ``item_vocab`` and ``user_features``: titles, feature bags and user attributes, from
   tables or from feature columns per row (see ``trainer.data.features``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from trainer.data.dataset import Dataset
from trainer.data.features import (
    ItemTable,
    UserTable,
    encode_user_table,
    first_rows,
    item_table_from_rows,
    user_table_from_rows,
    with_item_table,
)
from trainer.data.sequences import Interactions, split_positions
from trainer.data.vocab import ItemVocab, id_keys, public_ids

logger = logging.getLogger(__name__)


@dataclass
class Rows:
    """Interaction rows in file order.

    Attributes:
        users, items: ``[R]`` original id keys (int64 or str, see ``id_keys``).
        timestamps: int64 ``[R]`` seconds.
        user_columns: name -> ``[R]`` categorical user values per row.
        item_columns: name -> ``[R]`` ``|``-separated item tokens per row.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    user_columns: dict[str, np.ndarray] = field(default_factory=dict)
    item_columns: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, rows: np.ndarray) -> Rows:
        """The rows ``rows`` (int64 indices), in that order."""
        return Rows(
            self.users[rows],
            self.items[rows],
            self.timestamps[rows],
            {n: v[rows] for n, v in self.user_columns.items()},
            {n: v[rows] for n, v in self.item_columns.items()},
        )


def interaction_rows(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    *,
    origin: str,
    user_columns: dict[str, np.ndarray] | None = None,
    item_columns: dict[str, np.ndarray] | None = None,
) -> Rows:
    """Checked ``Rows``: one user, item and timestamp per row, at least one row."""
    n_rows = len(user_ids)
    if not (len(item_ids) == n_rows == len(timestamps)):
        raise ValueError(
            f"user_ids, item_ids and timestamps must have one entry per interaction, got "
            f"{len(user_ids)}, {len(item_ids)}, {len(timestamps)}."
        )
    if n_rows == 0:
        raise ValueError(f"{origin}: no interactions; expected at least one row of data.")
    ts = np.asarray(timestamps, dtype=np.int64)
    return Rows(
        id_keys(user_ids),
        id_keys(item_ids),
        ts,
        {n: np.asarray(v) for n, v in (user_columns or {}).items()},
        {n: np.asarray(v) for n, v in (item_columns or {}).items()},
    )


def unique_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vocab, codes)``: the sorted distinct keys and int64 ``[len(keys)]`` codes into them."""
    vocab, codes = np.unique(keys, return_inverse=True)
    return vocab, codes.reshape(-1)


def remove_short_users(
    rows: Rows, users: np.ndarray, codes: np.ndarray, *, origin: str, drop: bool
) -> tuple[Rows, np.ndarray, np.ndarray]:
    """Drop users with fewer than 2 interactions, or fail naming one when ``drop`` is False.

    Args:
        rows: the interaction rows.
        users: ``[U]`` user keys; ``codes``: int64 ``[R]`` each row's index into ``users``.

    Returns:
        ``(rows, users, codes)`` without the short users' rows, codes re-numbered.
    """
    counts = np.bincount(codes, minlength=len(users))
    short = np.flatnonzero(counts < 2)
    if not len(short):
        return rows, users, codes
    _check_drop(users, counts, short, origin=origin, drop=drop)
    keep = counts >= 2
    kept = np.flatnonzero(keep[codes])
    logger.info(
        "%s: dropped %d user(s) with fewer than 2 interactions (%d interactions)",
        origin,
        len(short),
        len(codes) - len(kept),
    )
    return rows.take(kept), users[keep], (np.cumsum(keep) - 1)[codes[kept]]


def _check_drop(
    users: np.ndarray, counts: np.ndarray, short: np.ndarray, *, origin: str, drop: bool
) -> None:
    if not drop:
        first = users[short[0]].tolist()
        raise ValueError(
            f"{origin}: user {first!r} has {counts[short[0]]} interaction(s) "
            f"({len(short)} user(s) have fewer than 2); every user needs at least 2 "
            f"(history + test target). Set drop_short_users=True to drop them, or remove "
            f"them from the data."
        )
    if len(short) == len(users):
        raise ValueError(
            f"{origin}: every user has fewer than 2 interactions; nothing left to train on "
            f"after drop_short_users. Expected users with at least 2 interactions."
        )


def group_by_user(
    codes: np.ndarray, timestamps: np.ndarray, num_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(order, offsets)``: rows sorted by user then time (stable), and the CSR offsets.

    ``order`` is int64 ``[R]`` (position -> row); ``offsets`` int64 ``[num_users + 1]``.
    """
    order = np.lexsort((timestamps, codes))  # stable: equal times keep file order
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=num_users), out=offsets[1:])
    return order, offsets


def index_items(items: np.ndarray, catalogue: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, codes)``: the sorted distinct item keys of the rows and of ``catalogue``, and
    int64 ``[R]`` each row's code. Int and str keys together are all compared as str."""
    if catalogue is not None and len(catalogue):
        extra = id_keys(catalogue)
        if extra.dtype.kind != items.dtype.kind:
            extra, items = extra.astype(str), items.astype(str)
        keys, codes = unique_codes(np.concatenate([items, extra]))
        return keys, codes[: len(items)]
    return unique_codes(items)


def order_items(
    codes: np.ndarray, train: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """The internal item order: by training-target count, then unseen items by total count.

    Args:
        codes: int64 ``[total]`` item codes of the sequence positions.
        train: int64 training target positions into ``codes``.
        num_items: how many item codes there are.

    Returns:
        ``(perm, popularity)``: ``perm[i]`` is the code of internal item ``i``; ``popularity``
        int64 ``[num_items]`` the training-target count of each internal item.
    """
    train_counts = np.bincount(codes[train], minlength=num_items)
    total_counts = np.bincount(codes, minlength=num_items)
    unseen_key = np.where(train_counts == 0, -total_counts, 0)
    perm = np.lexsort((np.arange(num_items), unseen_key, -train_counts))
    return perm, train_counts[perm]


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """int64 ``inv`` with ``inv[perm[i]] == i``."""
    inv = np.empty(len(perm), dtype=np.int64)
    inv[perm] = np.arange(len(perm), dtype=np.int64)
    return inv


def latest_train_time(seq: Interactions, train: np.ndarray, held_out: np.ndarray) -> int:
    """The latest timestamp among the training targets; without any, among the positions
    that are not ``held_out`` (validation and test targets)."""
    if len(train):
        return int(seq.timestamps[train].max())
    mask = np.ones(len(seq), dtype=bool)
    mask[held_out] = False
    return int(seq.timestamps[mask].max())


def item_vocab(
    rows: Rows,
    keys: np.ndarray,
    codes: np.ndarray,
    perm: np.ndarray,
    popularity: np.ndarray,
    table: ItemTable | None,
    order: list[str] | None,
) -> ItemVocab:
    """The item vocabulary in internal order, with titles and feature bags.

    Args:
        rows: the interaction rows; their item columns, if any, replace ``table`` (each item
            takes the tokens of its first row).
        keys: ``[num_items]`` item keys; ``codes``: int64 ``[R]`` each row's index into them.
        perm, popularity: from ``order_items``.
        table: side information keyed by original id, or None.
        order: the leading tokens of the feature vocabulary.
    """
    items = ItemVocab(original_ids=public_ids(keys[perm]), popularity=popularity)
    if rows.item_columns:
        first = first_rows(codes, len(keys))[perm]
        table = item_table_from_rows(rows.item_columns, first, keys[perm])
    return items if table is None else with_item_table(items, table, order)


def user_features(
    rows: Rows, users: np.ndarray, latest_row: np.ndarray, table: UserTable | None
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``encode_user_table`` of ``table``, or of the rows' user columns when they have any.

    Args:
        rows: the interaction rows.
        users: ``[num_users]`` user keys in internal order.
        latest_row: int64 ``[num_users]`` the row of each user's latest interaction.
        table: side information keyed by original id, or None.
    """
    if rows.user_columns:
        table = user_table_from_rows(rows.user_columns, latest_row, users)
    return encode_user_table(users, table)


def build_dataset(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    *,
    origin: str,
    fingerprint: str,
    max_history: int = 50,
    drop_short_users: bool = False,
    holdout: str = "test",
    user_table: UserTable | None = None,
    item_table: ItemTable | None = None,
    row_user_features: dict[str, np.ndarray] | None = None,
    row_item_features: dict[str, np.ndarray] | None = None,
    item_vocab_order: list[str] | None = None,
    catalogue: np.ndarray | None = None,
) -> Dataset:
    """Index, sort, split and re-index raw interactions (see the module docstring).

    Args:
        user_ids, item_ids: ``[R]`` original ids, int64 or str, one per interaction row.
        timestamps: int64 ``[R]`` seconds.
        origin: the file (or source) the rows came from, named in error messages.
        fingerprint: stored on the data set.
        max_history: stored on the data set.
        drop_short_users: drop users with fewer than 2 interactions (else ValueError).
        holdout: what ``split_positions`` holds out (``test``, ``valid`` or ``none``).
        user_table, item_table: side information keyed by original id.
        row_user_features: name -> ``[R]`` str values; a user takes the value of its latest row.
        row_item_features: name -> ``[R]`` ``|``-separated token strings; an item takes the
            tokens of its first row in the file. With several columns tokens are named
            ``"name:token"``.
        item_vocab_order: fixed leading order of the item token vocabulary.
        catalogue: original ids of items to index even if no row mentions them (they come
            last, by id, with popularity 0).
    """
    rows = interaction_rows(
        user_ids,
        item_ids,
        timestamps,
        origin=origin,
        user_columns=row_user_features,
        item_columns=row_item_features,
    )
    users, user_codes = unique_codes(rows.users)
    rows, users, user_codes = remove_short_users(
        rows, users, user_codes, origin=origin, drop=drop_short_users
    )
    order, offsets = group_by_user(user_codes, rows.timestamps, len(users))
    item_keys, item_codes = index_items(rows.items, catalogue)
    train, valid, test = split_positions(offsets, holdout)
    perm, popularity = order_items(item_codes[order], train, len(item_keys))
    new_codes = inverse_permutation(perm)[item_codes[order]]
    seq = Interactions(offsets, new_codes, rows.timestamps[order])
    items = item_vocab(rows, item_keys, item_codes, perm, popularity, item_table, item_vocab_order)
    features, vocab = user_features(rows, users, order[offsets[1:] - 1], user_table)
    ds = Dataset(
        num_users=len(users),
        num_items=len(item_keys),
        items=items,
        users=public_ids(users),
        user_features=features,
        user_feature_vocab=vocab,
        seq=seq,
        train_positions=train,
        valid_positions=valid,
        test_positions=test,
        fingerprint=fingerprint,
        t_max=latest_train_time(seq, train, np.concatenate([valid, test])),
        max_history=max_history,
        name=origin,
    )
    logger.info("%s", ds.summary())
    return ds
