"""The in-memory data set: vocabularies, per-user sequences in time order, and the split.

``trainer.data.build.build_dataset`` makes one (its docstring gives the split and the item
order); an example is a target position ``p`` in ``seq.items`` whose input is the history
strictly before ``p`` of the same user (``trainer.data.sequences.history_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from trainer.data.sequences import Interactions
from trainer.data.vocab import IdIndex, ItemVocab

__all__ = ["Dataset", "Split"]

Split = Literal["train", "valid", "test"]


@dataclass(eq=False)
class Dataset:
    """A loaded data set; see ``trainer.data.build`` for the split and the item order.

    Attributes:
        num_users, num_items: sizes of the vocabularies.
        items: the item vocabulary (ids, popularity, titles, feature bags).
        users: ``[num_users]`` original user ids (int64 or object str), ascending.
        user_features: name -> int64 ``[num_users]`` codes into ``user_feature_vocab[name]``;
            0 is ``"<unk>"``.
        user_feature_vocab: name -> value names, index 0 ``"<unk>"``.
        seq: the interactions in time order per user.
        train_positions, valid_positions, test_positions: int64 target positions into
            ``seq.items``, ascending.
        fingerprint: sha256 hex of the source files' bytes and the data config (for synthetic
            data, of the config alone).
        t_max: the latest timestamp among the training targets (for an example-age feature).
        max_history: the configured history length.
        name: a short description of the source (file or folder), used in messages.
    """

    num_users: int
    num_items: int
    items: ItemVocab
    users: np.ndarray
    user_features: dict[str, np.ndarray]
    user_feature_vocab: dict[str, list[str]]
    seq: Interactions
    train_positions: np.ndarray
    valid_positions: np.ndarray
    test_positions: np.ndarray
    fingerprint: str
    t_max: int
    max_history: int = 50
    name: str = ""
    _user_index: IdIndex | None = field(default=None, repr=False, compare=False)

    def user_lookup(self, original_ids: Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
        """int64 internal user indices (same shape as the input); -1 for unknown users."""
        if self._user_index is None:
            self._user_index = IdIndex(self.users)
        return self._user_index(original_ids)

    def positions(self, split: Split) -> np.ndarray:
        """The target positions of ``split`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}.")
        return getattr(self, f"{split}_positions")

    def summary(self) -> str:
        """One line: source, sizes, and examples per split."""
        return (
            f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
            f"{len(self.seq):,} interactions; examples train {len(self.train_positions):,}, "
            f"valid {len(self.valid_positions):,}, test {len(self.test_positions):,}"
        )
