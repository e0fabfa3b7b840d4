"""``load_dataset``: the one entry point from a ``DataConfig`` to a ``Dataset``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from trainer.data.config import DataConfig
from trainer.data.dataset import Dataset
from trainer.data.interactions import load_interactions
from trainer.data.movielens import RELEASES, load_movielens, release_files
from trainer.data.synthetic import load_synthetic

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = b"shardrec-data-v1"


def fingerprint(cfg: DataConfig, files: list[Path]) -> str:
    """sha256 hex of the files' bytes (in order) and the config.

    The config enters without its paths (``data_dir``, ``path``), so the same data and settings
    give the same fingerprint wherever the files live; ``synthetic`` enters only for synthetic
    data.
    """
    exclude = {"data_dir", "path"} | ({"synthetic"} if cfg.source != "synthetic" else set())
    h = hashlib.sha256(FINGERPRINT_VERSION + b"\0")
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True).encode())
    for f in files:
        h.update(b"\0" + f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split and index the data named by ``cfg`` (see ``trainer.data.dataset``)."""
    start = time.perf_counter()
    common = {
        "max_history": cfg.max_history,
        "drop_short_users": cfg.drop_short_users,
        "holdout": cfg.holdout,
    }
    if cfg.source == "synthetic":
        ds = load_synthetic(cfg.synthetic, fingerprint=fingerprint(cfg, []), **common)
    elif cfg.source in RELEASES:
        assert cfg.data_dir is not None
        files = release_files(cfg.source, cfg.data_dir)
        ds = load_movielens(
            cfg.source, files[0].parent, fingerprint=fingerprint(cfg, files), **common
        )
    else:
        assert cfg.path is not None
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"interactions file {path} does not exist; expected a .csv/.tsv/.parquet file "
                f"with columns {cfg.user_col!r}, {cfg.item_col!r}, {cfg.time_col!r}. Fix "
                f"data.path."
            )
        ds = load_interactions(cfg, path, fingerprint=fingerprint(cfg, [path]))
    logger.info("loaded %s in %.2fs", cfg.source, time.perf_counter() - start)
    return ds
