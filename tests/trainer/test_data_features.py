"""trainer.data.features: side tables from rows, and their encoding onto the vocabularies."""

from __future__ import annotations

import numpy as np

from trainer.data import features
from trainer.data.features import ItemTable, UserTable
from trainer.data.vocab import ItemVocab


def _vocab() -> ItemVocab:
    return ItemVocab(np.array([30, 10, 20], dtype=np.int64), np.array([3, 2, 0], dtype=np.int64))


def test_first_rows_per_code_and_minus_one_for_unseen():
    np.testing.assert_array_equal(
        features.first_rows(np.array([2, 0, 2, 0, 3]), 5), [1, -1, 0, 4, -1]
    )


def test_item_table_from_one_column_takes_the_first_row():
    genres = np.array(["a|b", "c", "zzz"])
    table = features.item_table_from_rows(
        {"genres": genres}, np.array([1, -1, 0]), np.array([7, 8, 9])
    )
    assert table.keys.tolist() == [7, 8, 9] and table.codes is None
    assert table.tokens.tolist() == ["c", "", "a|b"]


def test_item_table_from_several_columns_prefixes_tokens():
    columns = {"genres": np.array(["a| b", "", "c"]), "lang": np.array(["en", "fr", ""])}
    table = features.item_table_from_rows(columns, np.array([0, 1, 2, -1]), np.arange(4))
    assert table.tokens.tolist() == ["genres:a|genres:b|lang:en", "lang:fr", "genres:c", ""]


def test_user_table_from_rows_takes_the_given_row():
    columns = {"gender": np.array(["M", "F", "F", ""]), "age": np.array([1, 2, 3, 4])}
    table = features.user_table_from_rows(columns, np.array([3, 0]), np.array(["u1", "u2"]))
    assert table.keys.tolist() == ["u1", "u2"]
    assert table.columns["gender"].tolist() == ["", "M"] and table.columns["age"].tolist() == [4, 1]
    assert table.vocab_order == {}


def test_encode_user_table_codes_known_users_only():
    users = np.array([1, 2, 3], dtype=np.int64)
    table = UserTable(
        keys=np.array([3, 9, 1]),
        columns={"gender": np.array(["F", "X", "M"]), "seg": np.array(["s1", "s0", ""])},
        vocab_order={"seg": ["s0", "s1"]},
    )
    codes, vocab = features.encode_user_table(users, table)
    # user 2 is not in the table; user 9 is not a user, so its "X" is not in the vocabulary
    assert vocab == {"gender": ["<unk>", "F", "M"], "seg": ["<unk>", "s0", "s1"]}
    np.testing.assert_array_equal(codes["gender"], [2, 0, 1])
    np.testing.assert_array_equal(codes["seg"], [0, 0, 2])
    assert codes["gender"].dtype == np.int64
    assert features.encode_user_table(users, None) == ({}, {})


def test_encode_user_table_matches_string_keys_to_int_users():
    table = UserTable(keys=np.array(["2", "x"]), columns={"g": np.array(["F", "M"])})
    codes, vocab = features.encode_user_table(np.array([1, 2], dtype=np.int64), table)
    assert vocab == {"g": ["<unk>", "F"]} and codes["g"].tolist() == [0, 1]


def test_with_item_table_titles_and_tokens():
    vocab = _vocab()
    table = ItemTable(
        keys=np.array([10, 99, 30]),
        titles=np.array(["Ten", "Nope", "Thirty"]),
        tokens=np.array(["b|a", "q", "c"]),
    )
    out = features.with_item_table(vocab, table, ["c"])
    assert out.titles == ["Thirty", "Ten", ""]
    assert out.feature_vocab == ["c", "a", "b"]  # "q" belongs to an unknown item
    np.testing.assert_array_equal(out.features, [[0, -1], [2, 1], [-1, -1]])
    np.testing.assert_array_equal(out.original_ids, vocab.original_ids)
    np.testing.assert_array_equal(out.popularity, vocab.popularity)
    assert vocab.titles is None and vocab.features is None  # the input is left alone


def test_with_item_table_codes_keep_the_table_vocab():
    table = ItemTable(keys=np.array([20, 30]), codes=np.array([[1, -1], [0, 1]]), vocab=["x", "y"])
    out = features.with_item_table(_vocab(), table, ["ignored"])
    assert out.titles is None and out.feature_vocab == ["x", "y"]
    np.testing.assert_array_equal(out.features, [[0, 1], [-1, -1], [1, -1]])


def test_with_item_table_tokens_use_the_table_vocab_before_the_order():
    table = ItemTable(keys=np.array([20]), tokens=np.array(["b|z"]), vocab=["z", "b"])
    out = features.with_item_table(_vocab(), table, ["b"])
    assert out.feature_vocab == ["z", "b"]
    np.testing.assert_array_equal(out.features, [[-1, -1], [-1, -1], [1, 0]])


def test_with_item_table_without_bags_keeps_features_none():
    out = features.with_item_table(
        _vocab(), ItemTable(keys=np.array([10]), titles=np.array([5])), None
    )
    assert out.titles == ["", "5", ""] and out.features is None and out.feature_vocab is None
