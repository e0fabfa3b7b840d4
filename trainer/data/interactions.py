"""Loading a user-item interactions file (CSV, TSV or parquet) named by ``DataConfig.path``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from trainer.data.build import build_dataset
from trainer.data.config import DataConfig
from trainer.data.dataset import Dataset
from trainer.data.readers import read_table, to_ids, to_strings, to_timestamps

logger = logging.getLogger(__name__)


def load_interactions(cfg: DataConfig, path: Path, *, fingerprint: str) -> Dataset:
    """Read ``path`` with the column names of ``cfg`` and build the data set.

    Columns: ``cfg.user_col`` and ``cfg.item_col`` (int64 ids when every value is an integer,
    else strings), ``cfg.time_col`` (seconds; None orders interactions by file order), the
    categorical ``cfg.user_feature_cols`` and the ``|``-separated ``cfg.item_feature_cols``.
    When several item feature columns are given, their tokens are named ``"column:token"``.
    """
    wanted = [cfg.user_col, cfg.item_col]
    if cfg.time_col is not None:
        wanted.append(cfg.time_col)
    wanted += [*cfg.user_feature_cols, *cfg.item_feature_cols]
    wanted = list(dict.fromkeys(wanted))
    cols, where = read_table(path, wanted)
    label = str(path)
    users = to_ids(cols[cfg.user_col], cfg.user_col, label, where)
    items = to_ids(cols[cfg.item_col], cfg.item_col, label, where)
    if cfg.time_col is None:
        ts = np.arange(len(users), dtype=np.int64)
    else:
        ts = to_timestamps(cols[cfg.time_col], cfg.time_col, label, where)

    row_user = {c: to_strings(cols[c]) for c in cfg.user_feature_cols}
    row_items = {c: to_strings(cols[c]) for c in cfg.item_feature_cols}
    return build_dataset(
        users,
        items,
        ts,
        origin=label,
        fingerprint=fingerprint,
        max_history=cfg.max_history,
        drop_short_users=cfg.drop_short_users,
        holdout=cfg.holdout,
        row_user_features=row_user or None,
        row_item_features=row_items or None,
    )
