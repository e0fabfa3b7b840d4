"""trainer.data.vocab: id keys, IdIndex lookups, the item vocabulary and feature codes."""

from __future__ import annotations

import numpy as np
import torch

from trainer.data import vocab
from trainer.data.vocab import UNK, IdIndex, ItemVocab


def test_id_keys_keep_ints_and_compare_the_rest_as_text():
    ints = vocab.id_keys(np.array([3, 1], dtype=np.int32))
    assert ints.dtype == np.int64 and ints.tolist() == [3, 1]
    assert vocab.id_keys(np.array([2, 7], dtype=np.uint8)).dtype == np.int64
    assert vocab.id_keys(["a", 5]).tolist() == ["a", "5"]
    assert vocab.id_keys(np.array([1.0, 2.5])).tolist() == ["1.0", "2.5"]


def test_public_ids_are_int64_or_object_str():
    assert vocab.public_ids(np.array([1, 2], dtype=np.int32)).dtype == np.int64
    out = vocab.public_ids(np.array(["x", "yy"]))
    assert out.dtype == object and out.tolist() == ["x", "yy"]


def test_int_index_accepts_ints_integral_floats_and_numeric_text():
    index = IdIndex(np.array([50, 7, 1_000_000_000_000], dtype=np.int64))
    query = [7, "50", 50.0, " 7 ", b"50", 7.5, "x", True, None, 2**64, 1_000_000_000_000, 8]
    np.testing.assert_array_equal(
        index(np.array(query, dtype=object)), [1, 0, 0, 1, 0] + [-1] * 5 + [2, -1]
    )
    np.testing.assert_array_equal(index(np.array([7.0, np.nan, np.inf, 50.0])), [1, -1, -1, 0])
    np.testing.assert_array_equal(index(np.array([50, 9], dtype=np.uint16)), [0, -1])


def test_str_index_compares_text_and_keeps_the_query_shape():
    index = IdIndex(np.array(["b", "10", "a"], dtype=object))
    assert not index.is_int
    out = index(np.array([["a", "zz"], ["b", "10"]], dtype=object))
    assert out.shape == (2, 2) and out.dtype == np.int64
    np.testing.assert_array_equal(out, [[2, -1], [0, 1]])
    np.testing.assert_array_equal(index([10, "10"]), [1, 1])


def test_index_of_a_tensor_and_of_empty_inputs():
    index = IdIndex(np.array([4, 2], dtype=np.int64))
    np.testing.assert_array_equal(index(torch.tensor([[2, 4, 3]])), [[1, 0, -1]])
    assert index([]).shape == (0,)
    np.testing.assert_array_equal(IdIndex(np.array([], dtype=np.int64))([1, 2]), [-1, -1])


def test_index_with_repeated_ids_finds_the_first():
    np.testing.assert_array_equal(IdIndex(np.array([5, 3, 5]))([5, 3]), [0, 1])


def test_item_vocab_lookup_and_length():
    items = ItemVocab(np.array([30, 10, 20], dtype=np.int64), np.array([5, 2, 0]))
    assert len(items) == 3
    np.testing.assert_array_equal(items.lookup([20, "30", 99]), [2, 0, -1])
    assert items.titles is None and items.features is None and items.feature_vocab is None


def test_encode_categorical_unknown_is_zero_and_order_leads():
    codes, names = vocab.encode_categorical(np.array(["M", "", "F", "X", "M"]), ["M", "F"])
    assert names == [UNK, "M", "F", "X"]
    np.testing.assert_array_equal(codes, [1, 0, 2, 3, 1])
    codes, names = vocab.encode_categorical(np.array(["b", "a", ""]), None)
    assert names == [UNK, "a", "b"] and codes.tolist() == [2, 1, 0]
    assert codes.dtype == np.int64


def test_encode_categorical_literal_unk_and_numbers():
    codes, names = vocab.encode_categorical(np.array([UNK, 3, 12], dtype=object), None)
    assert names == [UNK, "12", "3"]  # "<unk>" itself codes to 0, values sort as text
    np.testing.assert_array_equal(codes, [0, 2, 1])


def test_encode_bags_dedupes_strips_and_pads():
    bags, names = vocab.encode_bags(np.array(["b|a", " a |a| ", "", "c"]), ["c"])
    assert names == ["c", "a", "b"]
    np.testing.assert_array_equal(bags, [[2, 1], [1, -1], [-1, -1], [0, -1]])
    assert bags.dtype == np.int64


def test_encode_bags_without_tokens_is_one_padded_column():
    bags, names = vocab.encode_bags(np.array(["", "|"]), None)
    assert names == [] and bags.shape == (2, 1) and (bags == -1).all()
    bags, names = vocab.encode_bags(np.array([], dtype=str), None)
    assert bags.shape == (0, 1) and names == []
