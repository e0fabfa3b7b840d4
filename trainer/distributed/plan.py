"""The pure plan of a Ray run: CPUs and GPUs per actor, each worker's config, seed and share of a
batch, and the epoch loss from every worker's steps. No Ray, no torch.distributed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import DistributedConfig, TrainConfig
from trainer.storage import is_uri


@dataclass(frozen=True)
class ResourcePlan:
    shard_cpus: float  # Ray CPUs reserved per shard actor
    worker_cpus: float  # Ray CPUs per trainer worker
    worker_gpus: int  # GPUs per trainer worker (0 or 1)


def plan_resources(
    dist_cfg: DistributedConfig, cluster_cpus: float, cluster_gpus: float, device: str
) -> ResourcePlan:
    """CPUs per shard and per worker (and one GPU per worker when the cluster has them).

    Shards get ``shard_cpus`` each (fractional: they mostly wait); workers share the rest, at
    most one CPU each, unless ``worker_cpus`` is set.

    Raises:
        ValueError: when the actors do not fit the cluster.
    """
    shards = dist_cfg.num_shards * dist_cfg.shard_cpus
    if dist_cfg.worker_cpus is not None:
        worker_cpus = dist_cfg.worker_cpus
    else:
        worker_cpus = math.floor(min(1.0, (cluster_cpus - shards) / dist_cfg.num_workers) * 100)
        worker_cpus /= 100
    if worker_cpus <= 0 or shards + worker_cpus * dist_cfg.num_workers > cluster_cpus + 1e-9:
        raise ValueError(
            f"{dist_cfg.num_shards} shards x {dist_cfg.shard_cpus} CPUs + "
            f"{dist_cfg.num_workers} workers x {worker_cpus} CPUs do not fit the cluster's "
            f"{cluster_cpus:g} CPUs; lower distributed.shard_cpus / worker_cpus / num_workers, "
            f"or start Ray with more CPUs."
        )
    gpus = 0
    if device != "cpu" and cluster_gpus >= dist_cfg.num_workers:
        gpus = 1
    elif device == "cuda":
        raise ValueError(
            f"device='cuda' needs one GPU per worker: {dist_cfg.num_workers} workers, the "
            f"cluster has {cluster_gpus:g} GPUs; use device=auto or cpu, or fewer workers."
        )
    return ResourcePlan(dist_cfg.shard_cpus, worker_cpus, gpus)


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute ``out_dir`` and local ``storage`` (actors may run in another working
    directory); a storage URI stays as it is."""
    update: dict = {"out_dir": Path(cfg.out_dir).expanduser().resolve()}
    if cfg.storage and not is_uri(cfg.storage):
        update["storage"] = str(Path(cfg.storage).expanduser().resolve())
    return cfg.model_copy(update=update)


def worker_config(cfg: TrainConfig, plan: ResourcePlan) -> TrainConfig:
    """The config the workers run: no progress bars, and the CPU when they got no GPU."""
    worker_cfg = cfg.model_copy(update={"progress": False})
    if plan.worker_gpus == 0 and cfg.device == "auto":
        worker_cfg = worker_cfg.model_copy(update={"device": "cpu"})
    return worker_cfg


def rank_seed(seed: int, rank: int) -> int:
    """Seed of worker ``rank``'s negative sampler (rank 0: the config's seed)."""
    return seed if rank == 0 else seed * 1_000_003 + 7919 * rank


def worker_part(positions: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Worker ``rank``'s contiguous part of a global batch's ``positions`` (maybe empty)."""
    return np.array_split(positions, world_size)[rank]


def combine_epoch_losses(logs: list[list[tuple[float, int]]]) -> float:
    """The epoch's training loss from every worker's per-step ``(loss, examples)``: per step
    the example-weighted mean over workers (the global batch's mean loss), then the mean over
    steps (as the local trainer reports it)."""
    steps = []
    for parts in zip(*logs):
        parts = [(loss, n) for loss, n in parts if n > 0]
        if len(parts) == 1:
            steps.append(parts[0][0])
        elif parts:
            steps.append(sum(loss * n for loss, n in parts) / sum(n for _, n in parts))
    return float(np.mean(steps)) if steps else float("nan")
