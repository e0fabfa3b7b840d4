"""trainer.data.build: each step of build_dataset, and the pipeline against a loop reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from trainer.data.build import (
    Rows,
    build_dataset,
    group_by_user,
    index_items,
    interaction_rows,
    inverse_permutation,
    item_vocab,
    latest_train_time,
    order_items,
    remove_short_users,
    unique_codes,
    user_features,
)
from trainer.data.features import ItemTable, UserTable
from trainer.data.sequences import Interactions


def _rows(users, items, ts, **columns) -> Rows:
    return interaction_rows(
        np.array(users), np.array(items), np.array(ts), origin="f.csv", user_columns=columns
    )


# --------------------------------------------------------------------------- rows


def test_interaction_rows_convert_ids_and_times():
    rows = interaction_rows(
        np.array([2, 1], dtype=np.int32),
        np.array(["a", 5], dtype=object),
        np.array([7, 3], dtype=np.int32),
        origin="f.csv",
        item_columns={"g": ["x", "y"]},
    )
    assert rows.users.dtype == np.int64 and rows.timestamps.dtype == np.int64
    assert rows.items.tolist() == ["a", "5"]
    assert rows.item_columns["g"].tolist() == ["x", "y"] and rows.user_columns == {}


def test_interaction_rows_reject_ragged_and_empty_input():
    with pytest.raises(ValueError, match="one entry per interaction, got 2, 1, 2"):
        interaction_rows(np.array([1, 2]), np.array([1]), np.array([1, 2]), origin="f.csv")
    with pytest.raises(ValueError, match=r"f\.csv: no interactions"):
        interaction_rows(np.array([]), np.array([]), np.array([]), origin="f.csv")


def test_rows_take_selects_every_column():
    rows = _rows([1, 2, 3], [4, 5, 6], [7, 8, 9], g=["a", "b", "c"])
    part = rows.take(np.array([2, 0]))
    assert part.users.tolist() == [3, 1] and part.items.tolist() == [6, 4]
    assert part.timestamps.tolist() == [9, 7] and part.user_columns["g"].tolist() == ["c", "a"]


def test_unique_codes():
    vocab, codes = unique_codes(np.array([30, 10, 30, 20]))
    assert vocab.tolist() == [10, 20, 30] and codes.tolist() == [2, 0, 2, 1]
    assert codes.ndim == 1


# --------------------------------------------------------------------------- users


def test_remove_short_users_keeps_everything_when_none_is_short():
    rows = _rows([1, 2, 1, 2], [5, 6, 7, 8], [1, 2, 3, 4])
    users, codes = unique_codes(rows.users)
    out = remove_short_users(rows, users, codes, origin="f.csv", drop=False)
    assert out[0] is rows and out[1] is users and out[2] is codes


def test_remove_short_users_drops_rows_and_renumbers(caplog):
    rows = _rows([5, 1, 2, 1, 7, 2], [10, 11, 12, 13, 14, 15], [0, 1, 2, 3, 4, 5])
    users, codes = unique_codes(rows.users)
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        rows, users, codes = remove_short_users(rows, users, codes, origin="f.csv", drop=True)
    assert "f.csv: dropped 2 user(s) with fewer than 2 interactions (2 interactions)" in caplog.text
    assert users.tolist() == [1, 2] and codes.tolist() == [0, 1, 0, 1]
    assert rows.items.tolist() == [11, 12, 13, 15] and rows.timestamps.tolist() == [1, 2, 3, 5]


def test_remove_short_users_errors():
    rows = _rows([1, 1, 4, 3], [1, 2, 3, 4], [1, 2, 3, 4])
    users, codes = unique_codes(rows.users)
    with pytest.raises(ValueError) as err:
        remove_short_users(rows, users, codes, origin="f.csv", drop=False)
    assert str(err.value).startswith("f.csv: user 3 has 1 interaction(s) (2 user(s) have fewer")
    assert "drop_short_users=True" in str(err.value)
    rows = _rows([1, 2], [1, 2], [1, 2])
    users, codes = unique_codes(rows.users)
    with pytest.raises(ValueError, match=r"f\.csv: every user has fewer than 2 interactions"):
        remove_short_users(rows, users, codes, origin="f.csv", drop=True)


def test_group_by_user_is_stable_for_equal_times():
    order, offsets = group_by_user(np.array([1, 0, 1, 1, 0]), np.array([5, 9, 5, 2, 1]), 3)
    assert order.tolist() == [4, 1, 3, 0, 2]  # rows 0 and 2 tie at t=5: file order
    assert offsets.tolist() == [0, 2, 5, 5] and offsets.dtype == np.int64


# --------------------------------------------------------------------------- items


def test_index_items_with_and_without_a_catalogue():
    keys, codes = index_items(np.array([30, 10, 30]), None)
    assert keys.tolist() == [10, 30] and codes.tolist() == [1, 0, 1]
    keys, codes = index_items(np.array([30, 10, 30]), np.array([40, 10, 5]))
    assert keys.tolist() == [5, 10, 30, 40] and codes.tolist() == [2, 1, 2]
    keys, codes = index_items(np.array([30, 10]), np.array(["x", 30], dtype=object))
    assert keys.tolist() == ["10", "30", "x"] and codes.tolist() == [1, 0]  # mixed: as text
    keys, _ = index_items(np.array([3]), np.array([], dtype=np.int64))
    assert keys.tolist() == [3]


def test_order_items_by_training_count_then_unseen_by_total_count():
    # codes of 6 items at 10 positions; training targets at positions 1, 2, 3, 5
    codes = np.array([4, 2, 0, 2, 5, 0, 3, 3, 3, 1])
    perm, popularity = order_items(codes, np.array([1, 2, 3, 5]), 6)
    # trained: 0 (2x), 2 (2x) by code; unseen: 3 (3 in all), then 1, 4, 5 (1 each) by code
    assert perm.tolist() == [0, 2, 3, 1, 4, 5]
    assert popularity.tolist() == [2, 2, 0, 0, 0, 0]
    inv = inverse_permutation(perm)
    assert inv.tolist() == [0, 3, 1, 2, 4, 5] and inv.dtype == np.int64
    assert (inv[perm] == np.arange(6)).all()


def test_latest_train_time_falls_back_to_positions_not_held_out():
    seq = Interactions(np.array([0, 3]), np.zeros(3, dtype=np.int64), np.array([4, 9, 7]))
    assert latest_train_time(seq, np.array([0]), np.array([1, 2])) == 4
    assert latest_train_time(seq, np.array([], dtype=np.int64), np.array([2])) == 9


def test_item_vocab_from_a_table_or_from_row_columns():
    rows = _rows([1, 1], [20, 10], [1, 2])
    keys, codes = np.array([10, 20]), np.array([1, 0])
    perm, pop = np.array([1, 0]), np.array([4, 3])
    plain = item_vocab(rows, keys, codes, perm, pop, None, None)
    assert plain.original_ids.tolist() == [20, 10] and plain.popularity.tolist() == [4, 3]
    assert plain.features is None
    table = ItemTable(keys=np.array([10]), tokens=np.array(["b|a"]))
    tabled = item_vocab(rows, keys, codes, perm, pop, table, ["b"])
    assert tabled.feature_vocab == ["b", "a"] and tabled.features.tolist() == [[-1, -1], [0, 1]]
    rows.item_columns = {"g": np.array(["x", "y"])}  # the rows' columns win over the table
    from_rows = item_vocab(rows, keys, codes, perm, pop, table, None)
    assert from_rows.feature_vocab == ["x", "y"] and from_rows.features.tolist() == [[0], [1]]


def test_user_features_from_a_table_or_from_row_columns():
    table = UserTable(keys=np.array([2]), columns={"g": np.array(["F"])})
    rows = _rows([1, 2], [1, 1], [1, 2])
    features, vocab = user_features(rows, np.array([1, 2]), np.array([0, 1]), table)
    assert vocab == {"g": ["<unk>", "F"]} and features["g"].tolist() == [0, 1]
    rows = _rows([1, 2], [1, 1], [1, 2], h=["M", "F"])
    features, vocab = user_features(rows, np.array([1, 2]), np.array([1, 0]), table)
    assert vocab == {"h": ["<unk>", "F", "M"]} and features["h"].tolist() == [1, 2]


# --------------------------------------------------------------------------- pipeline


def _reference(users, items, ts):
    """The documented protocol, written as loops over Python lists."""
    by_user = {}
    for row, (u, i, t) in enumerate(zip(users, items, ts)):
        by_user.setdefault(u, []).append((t, row, i))
    seqs = [[i for _, _, i in sorted(by_user[u])] for u in sorted(by_user)]
    train_items, all_items = [], []
    for s in seqs:
        train_items += s[1 : len(s) - 2]
        all_items += s
    train_count = {i: train_items.count(i) for i in set(all_items)}
    total = {i: all_items.count(i) for i in set(all_items)}

    def key(i):
        return (-train_count[i], -total[i] if train_count[i] == 0 else 0, i)

    order = sorted(set(all_items), key=key)
    return sorted(by_user), seqs, order, [train_count[i] for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_build_dataset_matches_the_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n_users = 12
    lengths = rng.integers(2, 9, n_users)
    users = rng.permutation(np.repeat(rng.choice(1000, n_users, replace=False), lengths))
    items = rng.integers(0, 15, len(users)) * 7
    ts = rng.integers(0, 6, len(users))  # many ties
    ds = build_dataset(users, items, ts, origin="r", fingerprint="f" * 64)
    want_users, seqs, item_order, popularity = _reference(users.tolist(), items.tolist(), ts)
    assert ds.users.tolist() == want_users and ds.num_users == n_users
    assert ds.items.original_ids.tolist() == item_order
    assert ds.items.popularity.tolist() == popularity
    assert (
        ds.seq.offsets.tolist() == np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).tolist()
    )
    assert ds.items.original_ids[ds.seq.items].tolist() == [i for s in seqs for i in s]
    np.testing.assert_array_equal(ds.test_positions, ds.seq.offsets[1:] - 1)
    assert ds.t_max == int(ds.seq.timestamps[ds.train_positions].max())
    assert ds.fingerprint == "f" * 64 and ds.name == "r" and ds.max_history == 50


def test_build_dataset_catalogue_and_row_features():
    ds = build_dataset(
        np.array([1, 1, 1, 1, 2, 2]),
        np.array([5, 6, 5, 7, 6, 5]),
        np.array([1, 2, 3, 4, 1, 2]),
        origin="x",
        fingerprint="",
        max_history=4,
        row_user_features={"g": np.array(["a", "a", "b", "c", "d", "e"])},
        row_item_features={"t": np.array(["p", "q", "r", "s", "u", "v"])},
        catalogue=np.array([9, 5]),
    )
    # user 1: 5, 6, 5, 7 (training target: 6); user 2: 6, 5. Item 9 only in the catalogue.
    assert ds.items.original_ids.tolist() == [6, 5, 7, 9]
    assert ds.items.popularity.tolist() == [1, 0, 0, 0]
    assert ds.items.feature_vocab == ["p", "q", "s"]  # each item's first row; 9 has none
    assert ds.items.features.tolist() == [[1], [0], [2], [-1]]
    assert ds.user_feature_vocab == {"g": ["<unk>", "c", "e"]}  # each user's latest row
    assert ds.user_features["g"].tolist() == [1, 2]
    assert ds.t_max == 2 and ds.max_history == 4
