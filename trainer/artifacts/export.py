"""Writing an artifact directory from a trained model (the trainer's side of the contract).

``export_artifacts`` writes the files of `trainer.artifacts.contract` from the data set, the
tower and the item tables, then the manifest. It imports the training config and the data layer,
so it is imported on its own (``from trainer.artifacts.export import export_artifacts``), never
by ``trainer.artifacts``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from trainer.artifacts.contract import write_manifest
from trainer.config import TrainConfig
from trainer.data import Dataset
from trainer.model import UserTower
from trainer.sequence import SequenceTower

logger = logging.getLogger(__name__)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def plot_curves(curves: list[dict], path: Path, monitor: str) -> None:
    """Loss and validation metrics per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [c["epoch"] for c in curves]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(epochs, [c["train_loss"] for c in curves], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    keys = sorted({k for c in curves for k in c if k.startswith("HR@")})
    for key in keys:
        b.plot(epochs, [c.get(key, np.nan) for c in curves], marker="o", label=key)
    b.set(xlabel="epoch", ylabel="validation (history excluded)", title=f"validation ({monitor})")
    if keys:
        b.legend()
    else:
        b.set_title("no validation split (data.holdout)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def export_artifacts(
    out: str | Path,
    cfg: TrainConfig,
    ds: Dataset,
    tower: UserTower | SequenceTower,
    tables: dict[str, torch.Tensor],
    curves: list[dict],
    metrics: dict,
) -> Path:
    """Write an artifact directory atomically (into a temporary sibling, then rename).

    Args:
        tables: ``output`` ``[N, D]``, ``bias`` ``[N]`` and, unless the weights are tied,
            ``input`` ``[N, Dh]``.

    Returns:
        The artifact directory.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_files(tmp, cfg, ds, tower, tables, curves)
        write_manifest(
            tmp,
            cfg.name,
            json.loads(cfg.to_json()),
            data_fingerprint=ds.fingerprint,
            num_items=ds.num_items,
            num_users=ds.num_users,
            embedding_dim=int(tables["output"].shape[1]),
            metrics=metrics,
            holdout=cfg.data.holdout,
        )
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old.{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported artifacts to %s", out)
    return out


def _write_files(tmp: Path, cfg: TrainConfig, ds: Dataset, tower, tables, curves) -> None:
    items = ds.items
    titles = items.titles or [""] * ds.num_items
    _write_csv(
        tmp / "items.csv",
        ["index", "original_id", "title", "popularity"],
        (
            (i, items.original_ids[i], titles[i], int(items.popularity[i]))
            for i in range(ds.num_items)
        ),
    )
    feat_names = sorted(ds.user_features)
    _write_csv(
        tmp / "users.csv",
        ["original_id", *feat_names],
        (
            [ds.users[u], *(int(ds.user_features[n][u]) for n in feat_names)]
            for u in range(ds.num_users)
        ),
    )
    seq = ds.seq
    users = np.repeat(np.arange(ds.num_users), np.diff(seq.offsets))
    _write_csv(
        tmp / "histories.csv",
        ["user_id", "item_id", "timestamp"],
        zip(ds.users[users], items.original_ids[seq.items], seq.timestamps.tolist()),
    )
    item_tables = {
        "output_embeddings": tables["output"].contiguous(),
        "output_biases": tables["bias"].contiguous(),
        # Tied weights: an independent copy, since safetensors refuses tensors sharing memory.
        "input_embeddings": tables.get("input", tables["output"]).contiguous().clone(),
    }
    save_file(item_tables, str(tmp / "item_tables.safetensors"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()},
        str(tmp / "user_tower.safetensors"),
    )
    (tmp / "features.json").write_text(
        json.dumps(
            {
                "user_features": {n: list(ds.user_feature_vocab[n]) for n in feat_names},
                "item_feature_vocab": list(items.feature_vocab or []),
                "max_history": ds.max_history,
            },
            indent=1,
        )
    )
    if curves:
        keys = sorted({k for c in curves for k in c}, key=lambda k: (k != "epoch", k))
        _write_csv(tmp / "curves.csv", keys, ([c.get(k, "") for k in keys] for c in curves))
        plot_curves(curves, tmp / "curves.png", cfg.monitor)
