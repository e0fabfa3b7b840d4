"""One trainer worker of a sharded run: the pipelined loop over a sharded store, with dense
gradients all-reduced between workers (torch.distributed; no Ray import here).

See :mod:`trainer.distributed` for the semantics (how a global batch is split, sync/async
prefetching, checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.data import Dataset
from trainer.distributed.plan import rank_seed, worker_part
from trainer.run_state import RunState, WorkerState
from trainer.shards.client import ShardedStore, StepTimes
from trainer.step import Batch, step_ids
from trainer.train import Trainer

logger = logging.getLogger(__name__)


def join_process_group(cfg: TrainConfig, rank: int, world_size: int, addr: str, port: int):
    """Join the workers' process group (nccl on GPUs, else gloo) at ``tcp://addr:port``.

    Returns:
        A gloo group for gathering Python objects when the collectives run on nccl, else None
        (the default group).
    """
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if addr == "127.0.0.1":  # one node: keep the collectives on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=cfg.distributed.collective_timeout_s),
    )
    return dist.new_group(backend="gloo") if cuda else None


class AllReduceOptimizer:
    """Wraps the dense optimizer: ``step()`` first sums ``weight * grad`` over all workers.

    ``train_step`` only calls ``zero_grad`` and ``step``; a missing gradient counts as zeros so
    that every worker steps every parameter identically.
    """

    def __init__(self, opt: torch.optim.Optimizer, params) -> None:
        self.opt = opt
        self.params = list(params)
        self.weight = 1.0

    @property
    def param_groups(self):
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.weight)
        dist.all_reduce(flat)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.opt.step()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


@dataclass
class Prepared:
    """One worker's part of a global batch, with its negatives and unique item ids."""

    batch: Batch | None  # None: no example of this global batch falls to this worker
    negatives: object
    ids: torch.Tensor | None
    weight: float  # examples of this part / examples of the global batch
    gen_before: torch.Tensor  # the sampler state before drawing these negatives


@dataclass
class WorkerTimes:
    """Seconds per phase summed over ``steps`` (pull/wait/push from :class:`StepTimes`)."""

    steps: int = 0
    examples: int = 0
    prepare: float = 0.0
    compute: float = 0.0
    total: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step


class ShardedTrainer(Trainer):
    """A :class:`~trainer.train.Trainer` whose steps are pipelined over a sharded store.

    Args:
        cfg: the run's config.
        dataset: the loaded data.
        store: this worker's :class:`~trainer.shards.client.ShardedStore`.
        rank, world_size: this worker among ``world_size`` (torch.distributed initialised by
            the caller when ``world_size > 1``, e.g. with :func:`join_process_group`).
        object_group: a gloo process group for gathering Python objects (None: the default).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Dataset,
        store: ShardedStore,
        rank: int = 0,
        world_size: int = 1,
        object_group=None,
    ) -> None:
        super().__init__(cfg, dataset, store=store)
        self.store: ShardedStore = store
        self.rank, self.world_size = rank, world_size
        self.object_group = object_group
        if rank:
            self.gen.manual_seed(rank_seed(cfg.seed, rank))
        if world_size > 1:
            self.dense_opt = AllReduceOptimizer(self.dense_opt, self.tower.parameters())
        d = cfg.distributed
        self.prefetch = d.prefetch
        self.prefetch_early = d.mode == "async" and d.max_staleness >= 1
        self.epoch_log: list[tuple[float, int]] = []  # this worker's (loss, examples) per step
        self.peer_states: list[WorkerState] | None = None
        self.times = WorkerTimes()

    # --- the loop ---------------------------------------------------------------------------
    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return step % self.cfg.distributed.shard_checkpoint_every == 0 or bool(
            every and step % every == 0
        )

    def prepare(self, order: np.ndarray, b: int) -> Prepared:
        """This worker's part of global batch ``b``: examples, negatives, unique ids."""
        start = time.perf_counter()
        bs = self.cfg.batch_size
        positions = order[b * bs : (b + 1) * bs]
        mine = worker_part(positions, self.rank, self.world_size)
        gen_before = self.gen.get_state()
        if len(mine) == 0:
            self.times.prepare += time.perf_counter() - start
            return Prepared(None, None, None, 0.0, gen_before)
        batch, negatives = self.draw_batch(mine)
        ids = step_ids(batch, negatives, self.num_items)[0]
        self.times.prepare += time.perf_counter() - start
        weight = self.examples_in(mine) / self.examples_in(positions)
        return Prepared(batch, negatives, ids, weight, gen_before)

    def step(self, cur: Prepared, step: int) -> tuple[float, int]:
        """Training step ``step`` (the next one) on ``cur``; (mean loss of the part, examples)."""
        if cur.batch is None:  # still take part in the all-reduce and in the shards' count
            self.dense_opt.zero_grad(set_to_none=True)
            self.dense_opt.step()
            self.store.push({}, {}, step)
            return float("nan"), 0
        if self.world_size > 1:
            self.dense_opt.weight = cur.weight
            self.store.grad_scale = cur.weight
        t = self.store.times
        inside = t.pull + t.wait + t.push
        start = time.perf_counter()
        loss = self.train_on(cur.batch, cur.negatives)
        self.times.compute += time.perf_counter() - start - (t.pull + t.wait + t.push - inside)
        return loss, len(cur.batch)

    def run_epoch(self, max_steps: int | None = None) -> list[tuple[float, int]]:
        """Train on the rest of the current epoch (or ``max_steps`` steps of it).

        Returns:
            This worker's ``(loss, examples)`` for every step of the epoch so far (including
            steps restored from a checkpoint).
        """
        order = self.epoch_order(self.epoch)
        n_batches = math.ceil(len(order) / self.cfg.batch_size)
        end = n_batches if max_steps is None else min(n_batches, self.batch_in_epoch + max_steps)
        self.tower.train()
        start = time.perf_counter()
        nxt = self.prepare(order, self.batch_in_epoch) if self.batch_in_epoch < end else None
        if self.prefetch and nxt is not None and nxt.ids is not None:
            self.store.prefetch(nxt.ids, self.global_step + 1)
        while self.batch_in_epoch < end:
            step_start = time.perf_counter()
            cur, step = nxt, self.global_step + 1
            b = self.batch_in_epoch + 1
            nxt = self.prepare(order, b) if b < end else None
            if self.prefetch and nxt is not None and nxt.ids is not None:
                if self.prefetch_early:
                    self.store.prefetch(nxt.ids, step + 1)
                else:
                    self.store.prefetch_after_push(nxt.ids, step + 1)
            loss, n = self.step(cur, step)
            self.global_step, self.batch_in_epoch = step, b
            self.epoch_log.append((loss, n))
            self.times.steps += 1
            self.times.examples += n
            self.times.step_seconds.append(time.perf_counter() - step_start)
            if self.checkpoint_due(step) and b < n_batches:
                self.gather_peer_states(nxt.gen_before if nxt is not None else None)
                if self.rank == 0:
                    self.save_checkpoint()
        self.store.flush()
        self.store.cancel_prefetch()
        self.times.total += time.perf_counter() - start
        self.gather_peer_states(None)
        return list(self.epoch_log)

    def end_epoch(self, train_loss: float, valid: dict[str, float], seconds: float) -> None:
        super().end_epoch(train_loss, valid, seconds)
        self.epoch_log = []

    def finish_epoch(self, train_loss: float, seconds: float) -> dict:
        """Worker 0, after every worker's :meth:`run_epoch`: validate, keep the best model,
        checkpoint (shards and trainer). Returns :meth:`status`."""
        start = time.perf_counter()
        valid = self.validate()
        self.end_epoch(train_loss, valid, seconds + time.perf_counter() - start)
        return self.status()

    def advance_epoch(self) -> None:
        """What :meth:`end_epoch` does to the position, on workers other than 0."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_log = []

    def tower_vector(self) -> torch.Tensor:
        """Every tower parameter, flat, on the CPU (the driver checks the workers agree)."""
        return torch.cat([p.detach().cpu().reshape(-1) for p in self.tower.parameters()])

    def bench(self, steps: int, warmup: int) -> dict:
        """Run ``warmup`` then ``steps`` steps; per-phase seconds of the measured steps
        (:class:`WorkerTimes` and the store's :class:`~trainer.shards.client.StepTimes`)."""
        self.run_epoch(max_steps=warmup)
        self.times, self.store.times = WorkerTimes(), StepTimes()
        self.run_epoch(max_steps=steps)
        return {**self.times.__dict__, **self.store.times.__dict__}

    # --- state ------------------------------------------------------------------------------
    def _own_state(self, gen: torch.Tensor | None) -> WorkerState:
        gen = self.gen.get_state() if gen is None else gen
        return WorkerState(gen, torch.get_rng_state(), list(self.epoch_log))

    def gather_peer_states(self, gen: torch.Tensor | None) -> None:
        """Collective: worker 0 gets every worker's sampler/RNG state and epoch losses."""
        mine = self._own_state(gen)
        if self.world_size == 1:
            self.peer_states = [mine]
            return
        out: list = [None] * self.world_size
        dist.all_gather_object(out, mine, group=self.object_group)
        self.peer_states = out

    def worker_states(self) -> list[WorkerState]:
        """Every worker's state as last gathered (the sampler's from before the prefetched
        batch's draw); at an epoch end the new epoch has no losses yet."""
        peers = self.peer_states or [self._own_state(None)]
        if self.batch_in_epoch == 0:
            peers = [dataclasses.replace(p, epoch_log=[]) for p in peers]
        return peers

    def store_state(self, tag: str) -> dict:
        """Every shard writes its file for this step first (the checkpoint, written after,
        is the commit point); the run state keeps their reference."""
        return self.store.save_shards(tag, self.global_step)

    def restore_store(self, state: RunState) -> None:
        """The driver has rolled the shards back to ``state``'s step already: check, follow."""
        if state.store["step"] != state.global_step:
            raise ValueError(
                f"the checkpoint in {self.out_dir} is inconsistent: shards at step "
                f"{state.store['step']}, trainer at step {state.global_step}; it was not written "
                f"by this trainer."
            )
        self.store.last_push_step = state.global_step

    def restore(self, state: RunState) -> None:
        super().restore(state)
        self.epoch_log = list(state.workers[self.rank].epoch_log)

    def status(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "curves": list(self.curves),
            "done": self.epoch >= self.cfg.epochs or self.bad_epochs >= self.cfg.patience,
        }
