"""The small synthetic data set the benchmark tests share."""

from __future__ import annotations

from trainer.data import DataConfig, Dataset, load_dataset

SYNTHETIC = {"num_users": 120, "num_items": 200, "mean_sequence_length": 12, "seed": 3}


def tiny_dataset(max_history: int = 8) -> Dataset:
    """120 synthetic users, 200 items; about 0.1 s."""
    return load_dataset(
        DataConfig(source="synthetic", max_history=max_history, synthetic=SYNTHETIC)
    )
