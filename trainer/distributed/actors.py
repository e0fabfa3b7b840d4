"""The trainer worker as a Ray actor: a thin shell around a
:class:`~trainer.distributed.worker.ShardedTrainer` on its own process (and GPU, if given)."""

from __future__ import annotations

import logging
import socket

import ray
import torch

from trainer.config import config_from_json
from trainer.data import Dataset
from trainer.distributed.worker import ShardedTrainer, join_process_group
from trainer.shards.actor import RayShards, setup_actor_process
from trainer.shards.client import ShardedStore


@ray.remote(max_restarts=0)
class TrainWorker:
    """Worker ``rank`` of ``world_size``, pulling from and pushing to the shard actors."""

    def __init__(
        self,
        cfg_json: str,
        dataset: Dataset,
        rank: int,
        world_size: int,
        shards: list,
        token: int,
        log_level: int = logging.INFO,
    ) -> None:
        setup_actor_process(log_level)
        self.cfg = config_from_json(cfg_json)
        self.ds = dataset
        self.rank, self.world_size = rank, world_size
        self.shards, self.token = shards, token
        self.trainer: ShardedTrainer | None = None

    def node(self) -> tuple[str, str]:
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int, load: bool) -> dict:
        """Join the process group, build the trainer, load ``checkpoint.pt`` if ``load``."""
        group = None
        if self.world_size > 1:
            group = join_process_group(
                self.cfg, self.rank, self.world_size, master_addr, master_port
            )
        d = self.cfg.distributed
        store = ShardedStore(
            RayShards(self.shards),
            self.ds.num_items,
            d.partition_strategy,
            token=self.token,
            worker=self.rank,
            staleness=d.max_staleness if d.mode == "async" else 0,
        )
        self.trainer = ShardedTrainer(self.cfg, self.ds, store, self.rank, self.world_size, group)
        if load:
            self.trainer.load_checkpoint()
        return self.trainer.status()

    def run_epoch(self) -> list[tuple[float, int]]:
        return self.trainer.run_epoch()

    def finish_epoch(self, train_loss: float, seconds: float) -> dict:
        """Worker 0: validate, keep the best model, checkpoint (shards and trainer)."""
        return self.trainer.finish_epoch(train_loss, seconds)

    def advance_epoch(self) -> None:
        self.trainer.advance_epoch()

    def status(self) -> dict:
        return self.trainer.status()

    def tower_vector(self) -> torch.Tensor:
        return self.trainer.tower_vector()

    def bench(self, steps: int, warmup: int) -> dict:
        return self.trainer.bench(steps, warmup)
