"""Synthetic artifacts of the serving benchmark: seeded item tables, exported once and cached."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.serve import logger


def random_tables(num_items: int, dim: int, seed: int) -> dict[str, object]:
    """Seeded item tables shaped like trained ones: low rank + noise, log-normal norms."""
    import torch

    rng = np.random.default_rng(seed)
    rank = 16
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    out = {}
    for name in ("output", "input"):
        table_ = np.empty((num_items, dim), dtype=np.float32)
        for start in range(0, num_items, 200_000):
            stop = min(num_items, start + 200_000)
            block = rng.standard_normal((stop - start, rank)).astype(np.float32) @ basis
            block += 0.3 * rng.standard_normal((stop - start, dim)).astype(np.float32)
            block *= rng.lognormal(0.0, 0.3, (stop - start, 1)).astype(np.float32)
            table_[start:stop] = block / np.sqrt(dim) * 4
        out[name] = torch.from_numpy(table_)
    out["bias"] = torch.from_numpy((0.1 * rng.standard_normal(num_items)).astype(np.float32))
    return out


def make_artifacts(args: argparse.Namespace, **override: int) -> Path:
    """The benchmark's artifact directory (built once, then reused while it verifies);
    ``num_items=`` / ``seed=`` / ``tower=`` (``mean``, the default, or ``sequence``) override
    the arguments. Every tower gets the same item tables for the same items and seed."""
    args = argparse.Namespace(**{"tower": "mean", **vars(args), **override})
    import torch

    from trainer.artifacts import ArtifactError, verify_artifacts
    from trainer.artifacts.export import export_artifacts
    from trainer.config import load_config
    from trainer.data import load_dataset
    from trainer.train import build_tower

    suffix = "" if args.tower == "mean" else f"-{args.tower}"
    out = args.work_dir / f"artifacts-{args.num_items}-d{args.dim}-s{args.seed}{suffix}"
    if (out / "manifest.json").exists():
        try:
            verify_artifacts(out)
            return out
        except ArtifactError as e:
            logger.warning("rebuilding %s: %s", out, e)
    start = time.perf_counter()
    cfg = load_config(
        None,
        [
            f"name=bench{args.num_items}",
            f"data.synthetic.num_items={args.num_items}",
            f"data.synthetic.num_users={args.num_users}",
            "data.synthetic.mean_sequence_length=20",
            f"data.synthetic.seed={args.seed}",
            f"model.embedding_dim={args.dim}",
            "model.hidden=[256]",
            f"model.tower={args.tower}",
            f"seed={args.seed}",
            "progress=false",
        ],
    )
    ds = load_dataset(cfg.data)
    torch.manual_seed(args.seed)
    tower = build_tower(cfg, ds)
    tables = random_tables(ds.num_items, args.dim, args.seed)
    export_artifacts(out, cfg, ds, tower, tables, curves=[], metrics={})
    logger.info("artifacts for %d items in %.0fs", ds.num_items, time.perf_counter() - start)
    return out
