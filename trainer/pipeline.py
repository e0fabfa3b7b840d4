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
from trainer.artifacts import MANIFEST, ArtifactError, Artifacts, load_artifacts, read_manifest
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


def resolve_epochs(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``epochs`` = the best epoch of the run ``cfg.epochs_from`` (a run directory
    or its ``artifacts/``), read from its manifest; ``cfg`` itself without ``epochs_from``.

    Raises:
        ValueError: no manifest there, or one without a best epoch.
    """
    if cfg.epochs_from is None:
        return cfg
    src = Path(cfg.epochs_from).expanduser()
    path = src if (src / MANIFEST).is_file() else src / "artifacts"
    try:
        manifest = read_manifest(path)
    except ArtifactError as e:
        raise ValueError(
            f"epochs_from={src}: expected a run directory (or its artifacts/) written by "
            f"'python -m trainer train'; {e}"
        ) from None
    best = manifest.metrics.get("best_epoch")
    if not isinstance(best, int) or best < 1:
        raise ValueError(
            f"epochs_from={src}: its manifest records no best epoch (metrics.best_epoch={best!r}); "
            f"set epochs instead."
        )
    logger.info(
        "epochs_from %s: training %d epoch(s), its best (data.holdout=%s there)",
        src,
        best,
        manifest.holdout,
    )
    return cfg.model_copy(update={"epochs": best})


def train_model(
    cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None
) -> TrainResult:
    """Train on the backend ``cfg.distributed`` asks for (Ray, or this process); the best
    epoch's model (the last one when nothing is held out for validation). ``epochs_from`` is
    resolved first (:func:`resolve_epochs`)."""
    cfg = resolve_epochs(cfg)
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
    results: dict = {}
    if len(ds.test_positions):
        results = test_split_metrics(ds, score_function(enc, tables, ds), result.cfg.eval_ks)
    results["train_seconds"] = train_seconds
    results["best_epoch"] = result.best_epoch + 1
    results["epochs"] = len(result.curves)
    if result.recoveries is not None:
        results["recoveries"] = result.recoveries
    if "model" in results:
        logger.info("test metrics:\n%s", format_table(_models(results), result.cfg.eval_ks))
    else:
        logger.info("%s", no_test_metrics(result.cfg.data.holdout))
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


def no_test_metrics(holdout: str) -> str:
    """What ``train`` says when the data held out no test split."""
    what = (
        "only each user's last interaction was held out, as validation"
        if holdout == "valid"
        else "every interaction was trained on"
    )
    return (
        f"no test metrics: data.holdout={holdout} ({what}). Select the model and its epochs on "
        f"a run with data.holdout=test, then refit with data.holdout=none "
        f"epochs_from=<that run's directory> (README, Training)."
    )


def evaluate_artifacts(path: str | Path, data_dir: str | None = None, progress: bool = False):
    """Re-evaluate an artifact directory on its data (test split). Returns (results, table).

    Raises:
        ValueError: the model was trained with no test split held out (``data.holdout``).
    """
    art: Artifacts = load_artifacts(path)
    holdout = art.manifest.holdout
    if holdout != "test":
        raise ValueError(
            f"{path} was trained with data.holdout={holdout}: it has no test split to evaluate "
            f"on (its test targets were trained on or never held out). Evaluate the run made "
            f"with data.holdout=test instead."
        )
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
    """The test-metrics table stored in an artifact directory's manifest (or the sentence
    saying there are none)."""
    manifest = load_artifacts(path).manifest
    if "model" not in manifest["metrics"]:
        return no_test_metrics(manifest.holdout)
    return format_table(_models(manifest["metrics"]), manifest["config"]["eval_ks"])


__all__ = [
    "artifact_table",
    "evaluate_artifacts",
    "evaluate_model",
    "format_table",
    "no_test_metrics",
    "resolve_epochs",
    "run_training",
    "test_split_metrics",
    "train_model",
]
