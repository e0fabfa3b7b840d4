"""Per-user sequences in time order (CSR), the leave-last-out split, and histories.

An example is a target position ``p`` in ``seq.items``; its input is the history strictly
before ``p`` of the same user (``history_batch``, or every earlier item: ``history_sets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


@dataclass(eq=False)
class Interactions:
    """Each user's interactions in time order, as CSR.

    Attributes:
        offsets: int64 ``[num_users + 1]``; user ``u`` owns positions
            ``offsets[u]:offsets[u + 1]``.
        items: int64 ``[total]`` internal item indices.
        timestamps: int64 ``[total]`` seconds.
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        """int64 ``[num_users]`` interactions per user."""
        return np.diff(self.offsets)

    def user_of(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 internal user index of each position; same shape as ``positions``."""
        return _user_of(self, check_positions(self, positions))


class ItemSets(NamedTuple):
    """A set of items per row, as CSR: row ``i`` is ``items[offsets[i]:offsets[i + 1]]``.

    Attributes:
        offsets: int64 ``[num_rows + 1]``, starting at 0.
        items: int64 ``[total]``.
    """

    offsets: np.ndarray
    items: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.items[self.offsets[i] : self.offsets[i + 1]]

    def rows(self, start: int, stop: int) -> ItemSets:
        """Rows ``start:stop`` as a new ``ItemSets`` whose offsets start at 0."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return ItemSets(self.offsets[start : stop + 1] - lo, self.items[lo:hi])


def check_positions(seq: Interactions, positions: object) -> np.ndarray:
    """``positions`` as int64 (same shape), or ValueError when not integers in ``[0, len(seq))``."""
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    pos = np.asarray(positions)
    if pos.size == 0:
        return pos.astype(np.int64)
    if pos.dtype.kind not in "iu":
        raise ValueError(
            f"positions must be integers (indices into seq.items), got dtype {pos.dtype}."
        )
    pos = pos.astype(np.int64, copy=False)
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= len(seq.items):
        raise ValueError(
            f"positions must lie in [0, {len(seq.items)}) (seq.items), got values in "
            f"[{lo}, {hi}]; pass target positions such as dataset.train_positions."
        )
    return pos


def _user_of(seq: Interactions, pos: np.ndarray) -> np.ndarray:
    """The user of each (checked) position."""
    return np.searchsorted(seq.offsets, pos, side="right") - 1


def history_batch(
    seq: Interactions, positions: np.ndarray | Sequence[int], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The most recent ``max_len`` items strictly before each position, of the same user.

    Args:
        seq: the interactions.
        positions: int64 ``[N]`` target positions into ``seq.items``.
        max_len: history length.

    Returns:
        ``(hist, lengths)``: ``hist`` int64 ``[N, max_len]`` right-aligned (most recent item in
        the last column) and padded with -1 on the left; ``lengths`` int64 ``[N]`` the number
        of real items in each row (``min(max_len, items before the position)``).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}.")
    pos = check_positions(seq, positions).reshape(-1)
    starts = seq.offsets[_user_of(seq, pos)]
    lengths = np.minimum(pos - starts, max_len)
    idx = pos[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]
    valid = idx >= starts[:, None]
    hist = np.where(valid, seq.items[np.maximum(idx, 0)] if len(seq.items) else -1, -1)
    return hist.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)


def history_sets(seq: Interactions, positions: np.ndarray | Sequence[int]) -> ItemSets:
    """All items before each position, of the same user (for excluding them in evaluation).

    Args:
        seq: the interactions.
        positions: int64 ``[N]`` target positions.

    Returns:
        ``ItemSets`` with ``N`` rows; row ``i`` holds ``seq.items[start_i:positions[i]]`` in
        time order (repeats kept), where ``start_i`` is the first position of that user.
    """
    pos = check_positions(seq, positions).reshape(-1)
    starts = seq.offsets[_user_of(seq, pos)]
    lengths = pos - starts
    offsets = np.zeros(len(pos) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    items = seq.items[np.repeat(starts, lengths) + within]
    return ItemSets(offsets, items.astype(np.int64, copy=False))


def split_positions(
    offsets: np.ndarray, holdout: str = "test"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-last-out split of a CSR whose every user has at least 2 interactions.

    Args:
        offsets: int64 ``[num_users + 1]``, the CSR offsets of ``Interactions``.
        holdout: ``"test"``: test = each user's last position, valid = the one before it for
            users with >= 3 interactions; ``"valid"``: valid = each user's last position, no
            test; ``"none"``: nothing held out.

    Returns:
        ``(train, valid, test)`` int64 target positions, ascending; train = every position
        that is not held out and has at least one earlier interaction of the same user.
    """
    if holdout not in ("test", "valid", "none"):
        raise ValueError(f"holdout must be 'test', 'valid' or 'none', got {holdout!r}.")
    starts, ends = offsets[:-1], offsets[1:]
    n = ends - starts
    empty = np.zeros(0, dtype=np.int64)
    if holdout == "test":
        test = (ends - 1).astype(np.int64)
        valid = (ends - 2)[n >= 3].astype(np.int64)
        held = 2
    elif holdout == "valid":
        test, valid, held = empty, (ends - 1).astype(np.int64), 1
    else:
        test, valid, held = empty, empty, 0
    total = int(offsets[-1])
    within = np.arange(total, dtype=np.int64) - np.repeat(starts, n)
    n_rep = np.repeat(n, n)
    train = np.flatnonzero((within >= 1) & (within <= n_rep - 1 - held)).astype(np.int64)
    return train, valid, test


def target_windows(
    seq: Interactions, train: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's training targets cut into windows of at most ``max_len`` consecutive
    positions, from the latest backwards (the sequence tower's training examples).

    Args:
        seq: the interactions.
        train: int64 ``[T]`` training target positions, ascending.
        max_len: the most targets per window (the history length).

    Returns:
        ``(ends, counts)`` int64 ``[W]``, ascending by end: window ``w`` trains the targets
        ``ends[w] - counts[w] + 1 .. ends[w]``, all of one user and all in ``train``; every
        training position is in exactly one window.
    """
    if len(train) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    users = _user_of(seq, train)
    # a run = consecutive training positions of one user
    breaks = np.flatnonzero((np.diff(train) != 1) | (np.diff(users) != 0)) + 1
    run_start = np.concatenate([[0], breaks])
    run_end = np.concatenate([breaks, [len(train)]])  # exclusive, indices into train
    ends, counts = [], []
    for a, b in zip(run_start.tolist(), run_end.tolist()):
        last = b
        while last > a:
            first = max(a, last - max_len)
            ends.append(int(train[last - 1]))
            counts.append(last - first)
            last = first
    order = np.argsort(ends)
    return (
        np.asarray(ends, dtype=np.int64)[order],
        np.asarray(counts, dtype=np.int64)[order],
    )
