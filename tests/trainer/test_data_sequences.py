"""trainer.data.sequences: the CSR of interactions, item sets, position checks and the split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trainer.data.sequences import (
    Interactions,
    ItemSets,
    check_positions,
    history_batch,
    split_positions,
)

# users of 2, 3 and 4 interactions
SEQ = Interactions(
    offsets=np.array([0, 2, 5, 9], dtype=np.int64),
    items=np.array([4, 1, 0, 0, 2, 3, 1, 1, 0], dtype=np.int64),
    timestamps=np.arange(9, dtype=np.int64),
)


def test_interactions_sizes_and_user_of():
    assert SEQ.num_users == 3 and len(SEQ) == 9
    np.testing.assert_array_equal(SEQ.lengths(), [2, 3, 4])
    np.testing.assert_array_equal(SEQ.user_of([[0, 1], [2, 8]]), [[0, 0], [1, 2]])
    np.testing.assert_array_equal(SEQ.user_of(torch.tensor([4, 5])), [1, 2])


def test_check_positions_converts_and_rejects():
    out = check_positions(SEQ, np.array([3, 0], dtype=np.int32))
    assert out.dtype == np.int64 and out.tolist() == [3, 0]
    assert check_positions(SEQ, []).dtype == np.int64
    with pytest.raises(ValueError, match=r"must be integers.*float64"):
        check_positions(SEQ, [1.0])
    with pytest.raises(ValueError, match=r"\[0, 9\).*got values in \[-1, 2\]"):
        check_positions(SEQ, [2, -1])


def test_item_sets_rows():
    sets = ItemSets(np.array([0, 2, 2, 5]), np.array([7, 8, 1, 2, 3]))
    assert sets.num_rows == 3
    np.testing.assert_array_equal(sets.row(0), [7, 8])
    assert len(sets.row(1)) == 0
    part = sets.rows(1, 3)
    np.testing.assert_array_equal(part.offsets, [0, 0, 3])
    np.testing.assert_array_equal(part.items, [1, 2, 3])


def test_split_of_two_three_and_four_interactions():
    train, valid, test = split_positions(SEQ.offsets)
    np.testing.assert_array_equal(test, [1, 4, 8])
    np.testing.assert_array_equal(valid, [3, 7])
    np.testing.assert_array_equal(train, [6])
    assert train.dtype == valid.dtype == test.dtype == np.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, 25)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    train, valid, test = split_positions(offsets)
    want = {"train": [], "valid": [], "test": []}
    for lo, hi in itertools.pairwise(offsets.tolist()):
        want["test"].append(hi - 1)
        if hi - lo >= 3:
            want["valid"].append(hi - 2)
        want["train"] += list(range(lo + 1, hi - 2))
    assert train.tolist() == want["train"] and valid.tolist() == want["valid"]
    assert test.tolist() == want["test"]
    # every position is the target of at most one split; first positions of none
    everything = np.concatenate([train, valid, test])
    assert len(np.unique(everything)) == len(everything)
    assert not np.isin(offsets[:-1], everything).any()


def test_history_of_an_empty_sequence_position_list():
    hist, lengths = history_batch(SEQ, np.array([], dtype=np.int64), 3)
    assert hist.shape == (0, 3) and lengths.shape == (0,)
