"""Train (in process or on Ray) -> evaluate on the test split (model and popularity) -> export.

No import cycle: the Ray backend (:mod:`trainer.distributed.driver`) is imported only when a
config asks for it, and imports nothing from here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from trainer import metrics
from trainer.artifacts import Artifacts, load_artifacts
from trainer.artifacts.export import export_artifacts
from trainer.config import TrainConfig
from trainer.data import Dataset, load_dataset
from trainer.storage import publish_artifacts, run_storage
from trainer.train import TrainResult, evaluate_model, score_function, train_local

logger = logging.getLogger(__name__)


def test_split_metrics(ds: Dataset, model_score_fn, ks, progress: bool = False) -> dict:
    """Test-split metrics of the model and of the popularity baseline."""
    return {
        "model": metrics.evaluate(ds, model_score_fn, "test", ks=tuple(ks), progress=progress),
        "popularity": metrics.evaluate(
            ds, metrics.popularity_score_fn(ds), "test", ks=tuple(ks), progress=False
        ),
    }


def format_table(results: dict, ks=(10, 50, 100)) -> str:
    """A markdown table of HR@K / NDCG@K / MRR, filtered and unfiltered, per model."""
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    lines = [
        "| model | history | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, res in results.items():
        for mode in ("filtered", "unfiltered"):
            label = "excluded" if mode == "filtered" else "kept"
            vals = " | ".join(f"{res[mode].get(c, float('nan')):.4f}" for c in cols)
            lines.append(f"| {name} | {label} | {vals} |")
    return "\n".join(lines)


def _models(results: dict) -> dict:
    return {k: results[k] for k in ("model", "popularity") if k in results}


def train_model(
    cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None
) -> TrainResult:
    """Train on the backend ``cfg.distributed`` asks for (Ray, or this process); the best
    epoch's model."""
    if cfg.distributed.uses_ray:
        from trainer.distributed.driver import train_distributed  # imports Ray

        return train_distributed(cfg, resume=resume, dataset=dataset)
    return train_local(cfg, resume=resume, dataset=dataset)


def run_training(cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None) -> Path:
    """Train with ``cfg``, evaluate the best epoch on the test split, export. Returns the
    artifact directory (``<out_dir>/artifacts``)."""
    start = time.perf_counter()
    result = train_model(cfg, resume=resume, dataset=dataset)
    train_seconds = time.perf_counter() - start
    ds, tables, enc = result.dataset, result.tables, result.encoder()
    results = test_split_metrics(ds, score_function(enc, tables, ds), result.cfg.eval_ks)
    results["train_seconds"] = train_seconds
    results["best_epoch"] = result.best_epoch + 1
    if result.recoveries is not None:
        results["recoveries"] = result.recoveries
    logger.info("test metrics:\n%s", format_table(_models(results), result.cfg.eval_ks))
    path = export_artifacts(
        Path(result.cfg.out_dir) / "artifacts",
        result.cfg,
        ds,
        enc.tower,
        tables,
        result.curves,
        results,
    )
    if result.cfg.storage:  # the run's storage gets a verified copy
        publish_artifacts(path, run_storage(result.cfg) / "artifacts")
    return path


def evaluate_artifacts(path: str | Path, data_dir: str | None = None, progress: bool = False):
    """Re-evaluate an artifact directory on its data (test split). Returns (results, table)."""
    art: Artifacts = load_artifacts(path)
    data_cfg = art.config.data
    if data_dir is not None:
        data_cfg = data_cfg.model_copy(update={"data_dir": Path(data_dir)})
    ds = load_dataset(data_cfg)
    if ds.fingerprint != art.manifest.get("data_fingerprint"):
        logger.warning(
            "data fingerprint %s differs from the one the model was trained on (%s)",
            ds.fingerprint[:12],
            str(art.manifest.get("data_fingerprint"))[:12],
        )
    if list(ds.items.original_ids.astype(str)) != list(art.item_ids):
        raise ValueError(
            f"the data's item vocabulary does not match the artifacts in {path}; evaluate with "
            f"the data the model was trained on."
        )
    tables = {
        "output": torch.from_numpy(np.asarray(art.output_embeddings)),
        "bias": torch.from_numpy(np.asarray(art.output_biases)),
    }
    ks = art.config.eval_ks
    results = test_split_metrics(ds, score_function(art.encoder, tables, ds), ks, progress)
    return results, format_table(results, ks)


def artifact_table(path: str | Path) -> str:
    """The test-metrics table stored in an artifact directory's manifest."""
    manifest = load_artifacts(path).manifest
    return format_table(_models(manifest["metrics"]), manifest["config"]["eval_ks"])


__all__ = [
    "artifact_table",
    "evaluate_artifacts",
    "evaluate_model",
    "format_table",
    "run_training",
    "test_split_metrics",
    "train_model",
]
