"""Training data: configs, loaders (synthetic, MovieLens, interaction files), split, histories.

Typical use::

    ds = load_dataset(DataConfig(source="movielens-100k", data_dir="../shared/data/ml-100k"))
    hist, lengths = history_batch(ds.seq, ds.train_positions[:256], ds.max_history)
    targets = ds.seq.items[ds.train_positions[:256]]

The names below are imported on first use, so that ``trainer.data.config`` (pydantic only)
can be imported without numpy, torch or pyarrow. Modules: ``config`` (settings), ``vocab``
(ids, item vocabulary, feature codes), ``sequences`` (CSR sequences, split, histories),
``features`` (side tables), ``dataset`` (the ``Dataset``), ``build`` (rows -> ``Dataset``),
``readers`` (files -> columns), ``interactions`` / ``movielens`` / ``synthetic`` (sources),
``loader`` (``load_dataset``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.data.build import build_dataset
    from trainer.data.config import DataConfig, SyntheticConfig
    from trainer.data.dataset import Dataset
    from trainer.data.loader import fingerprint, load_dataset
    from trainer.data.sequences import (
        Interactions,
        ItemSets,
        history_batch,
        history_sets,
        split_positions,
        target_windows,
    )
    from trainer.data.synthetic import generate as generate_synthetic
    from trainer.data.vocab import IdIndex, ItemVocab

# public name -> (module, attribute)
_EXPORTS = {
    "DataConfig": ("trainer.data.config", "DataConfig"),
    "Dataset": ("trainer.data.dataset", "Dataset"),
    "IdIndex": ("trainer.data.vocab", "IdIndex"),
    "Interactions": ("trainer.data.sequences", "Interactions"),
    "ItemSets": ("trainer.data.sequences", "ItemSets"),
    "ItemVocab": ("trainer.data.vocab", "ItemVocab"),
    "SyntheticConfig": ("trainer.data.config", "SyntheticConfig"),
    "build_dataset": ("trainer.data.build", "build_dataset"),
    "fingerprint": ("trainer.data.loader", "fingerprint"),
    "generate_synthetic": ("trainer.data.synthetic", "generate"),
    "history_batch": ("trainer.data.sequences", "history_batch"),
    "history_sets": ("trainer.data.sequences", "history_sets"),
    "load_dataset": ("trainer.data.loader", "load_dataset"),
    "split_positions": ("trainer.data.sequences", "split_positions"),
    "target_windows": ("trainer.data.sequences", "target_windows"),
}
__all__ = [
    "DataConfig",
    "Dataset",
    "IdIndex",
    "Interactions",
    "ItemSets",
    "ItemVocab",
    "SyntheticConfig",
    "build_dataset",
    "fingerprint",
    "generate_synthetic",
    "history_batch",
    "history_sets",
    "load_dataset",
    "split_positions",
    "target_windows",
]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
