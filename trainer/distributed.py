"""Ray training: item tables sharded over actors, N trainer workers, rollback on failures.

Layout of a run (``python -m trainer train --num-shards 4 --num-workers 2``)::

    driver (this module)  --creates-->  P ShardActor (trainer.shard_actor), restartable
                          --creates-->  N TrainWorker, each a ShardedTrainer + ShardedStore
    TrainWorker r  --pull/push-->  every shard (one call per shard per step, concurrently)
    TrainWorker r  <--all-reduce-->  the other workers' dense gradients (torch.distributed)

Semantics.

* Each global batch (``batch_size`` examples, the local trainer's order) is split into N
  contiguous parts; worker ``r`` computes part ``r`` with its own negatives (worker 0 draws
  from ``seed``, so one worker reproduces the in-process trainer exactly). Dense gradients
  are weighted by ``n_r / batch`` and all-reduced (gloo on CPU, nccl on GPU) before every
  worker steps its Adam, so the towers stay identical; row gradients are weighted the same
  way and, in ``sync`` mode, summed by the shards and applied once per step.
* ``sync``: a pull for step ``t`` sees every push of steps < t, so one worker reproduces the
  in-process trainer exactly. The next step's rows are prefetched right after this step's
  push is issued (not earlier: they may be rows this push changes); the shard answers that
  pull once the push is in, and the worker meanwhile prepares the batch after next. Shards
  apply a push lazily: the pending updates of the rows a pull reads first, the rest right
  after replying, so most of the row optimizer's work overlaps the worker's next step
  (exact: the optimizer is row-wise). ``async``: a pull for step ``t`` only waits for steps
  <= ``t - 1 - max_staleness``, and the next step's rows are prefetched *before* the
  current step computes (staleness 1 when ``max_staleness >= 1``).
* Checkpoints: every ``shard_checkpoint_every`` steps (and ``checkpoint_every`` if set) and
  at every epoch end, all shards write ``<out_dir>/shards/shard-<i>.pt`` (two slots, atomic)
  and then worker 0 writes ``checkpoint.pt`` (tower, optimizer, data position, every worker's
  sampler generator and the partial epoch's losses). ``checkpoint.pt`` is the commit point.
* Failures: a killed shard restarts (Ray ``max_restarts``), reloads its last file and refuses
  requests until the driver has rolled *every* shard and worker back to the step of
  ``checkpoint.pt`` (a shard that came back alone would mix timelines). The workers are
  recreated, the steps since that checkpoint are redone, and the log says which. A killed
  driver resumes with ``--resume`` the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import ActorUnavailableError, RayActorError

from trainer.artifacts.export import export_artifacts
from trainer.config import DistributedConfig, TrainConfig, config_from_json
from trainer.data import Dataset, load_dataset
from trainer.embeddings import atomic_torch_save
from trainer.model import UserEncoder, UserTower
from trainer.ray_store import (
    SHARD_DIR,
    RayShards,
    ShardedStore,
    ShardFailure,
    StepTimes,
    check_ref,
)
from trainer.shard_actor import create_shard_actors, setup_actor_process
from trainer.train import (
    BEST,
    CHECKPOINT,
    Batch,
    Trainer,
    build_tower,
    make_batch,
    score_function,
    step_ids,
    train_step,
)

logger = logging.getLogger(__name__)


# --- resources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResourcePlan:
    shard_cpus: float
    worker_cpus: float
    worker_gpus: int


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


# --- the worker's trainer --------------------------------------------------------------------
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


def rank_seed(seed: int, rank: int) -> int:
    """Seed of worker ``rank``'s negative sampler (rank 0: the config's seed)."""
    return seed if rank == 0 else seed * 1_000_003 + 7919 * rank


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
        store: this worker's :class:`~trainer.ray_store.ShardedStore`.
        rank, world_size: this worker among ``world_size`` (torch.distributed initialised by
            the caller when ``world_size > 1``).
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
        self.peer_states: list[dict] | None = None
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
        mine = np.array_split(positions, self.world_size)[self.rank]
        gen_before = self.gen.get_state()
        if len(mine) == 0:
            self.times.prepare += time.perf_counter() - start
            return Prepared(None, None, None, 0.0, gen_before)
        batch = make_batch(self.ds, mine)
        negatives = self.negatives(batch.targets, self.gen)
        ids = step_ids(batch, negatives, self.num_items)[0]
        self.times.prepare += time.perf_counter() - start
        return Prepared(batch, negatives, ids, len(mine) / len(positions), gen_before)

    def step(self, cur: Prepared, step: int) -> tuple[float, int]:
        """One training step on ``cur``; returns (mean loss of the part, examples)."""
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
        loss = train_step(
            self.tower,
            self.dense_opt,
            self.store,
            cur.batch,
            cur.negatives,
            self.cfg,
            self.num_items,
            step,
            self.device,
        )
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

    def advance_epoch(self) -> None:
        """What :meth:`end_epoch` does to the position, on workers other than 0."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_log = []

    # --- state ------------------------------------------------------------------------------
    def _own_state(self, gen: torch.Tensor | None) -> dict:
        return {
            "gen": self.gen.get_state() if gen is None else gen,
            "torch_rng": torch.get_rng_state(),
            "epoch_log": [list(x) for x in self.epoch_log],
        }

    def gather_peer_states(self, gen: torch.Tensor | None) -> None:
        """Collective: worker 0 gets every worker's sampler/RNG state and epoch losses."""
        mine = self._own_state(gen)
        if self.world_size == 1:
            self.peer_states = [mine]
            return
        out: list = [None] * self.world_size
        dist.all_gather_object(out, mine, group=self.object_group)
        self.peer_states = out

    def model_state(self) -> dict:
        """The best-model snapshot: the tower, and shard files (tag ``best``) written now."""
        return {
            "config": self.cfg.to_json(),
            "tower": {k: v.cpu() for k, v in self.tower.state_dict().items()},
            "store": self.store.save_shards("best", self.global_step),
            "epoch": self.epoch,
        }

    def save_checkpoint(self) -> Path:
        """Shard files first, then ``checkpoint.pt`` (the commit point); worker 0 only."""
        peers = self.peer_states or [self._own_state(None)]
        if self.batch_in_epoch == 0:  # at an epoch end the new epoch has no losses yet
            peers = [{**p, "epoch_log": []} for p in peers]
        state = {
            "config": self.cfg.to_json(),
            "tower": {k: v.cpu() for k, v in self.tower.state_dict().items()},
            "store": self.store.save_shards("ckpt", self.global_step),
            "epoch": self.epoch,
            "dense_opt": self.dense_opt.state_dict(),
            "gen": peers[0]["gen"],
            "torch_rng": peers[0]["torch_rng"],
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "curves": json.dumps(self.curves),
            "world_size": self.world_size,
            "workers": peers,
        }
        path = self.out_dir / CHECKPOINT
        atomic_torch_save(state, path)
        logger.info(
            "checkpoint at step %d (epoch %d, batch %d)",
            self.global_step,
            self.epoch + 1,
            self.batch_in_epoch,
        )
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore tower, optimizer, position and this worker's sampler (the driver restores
        the shards to the same step)."""
        path = Path(path) if path else self.out_dir / CHECKPOINT
        state = torch.load(path, weights_only=True)
        saved = config_from_json(state["config"])
        if saved.model != self.cfg.model or saved.data != self.cfg.data:
            raise ValueError(
                f"checkpoint {path} was written for another model or data config; resume with "
                f"the config saved in it ({path.parent / 'config.json'})."
            )
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {state.get('world_size')} workers, this run "
                f"has {self.world_size}; resume with --num-workers {state.get('world_size')}."
            )
        if state["store"]["step"] != state["global_step"]:
            raise ValueError(
                f"checkpoint {path} is inconsistent: shards at step {state['store']['step']}, "
                f"trainer at step {state['global_step']}; it was not written by this trainer."
            )
        self.tower.load_state_dict(state["tower"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        mine = state["workers"][self.rank]
        self.gen.set_state(mine["gen"])
        torch.set_rng_state(mine["torch_rng"])
        self.epoch_log = [(float(loss), int(n)) for loss, n in mine["epoch_log"]]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.curves = json.loads(state["curves"])
        self.store.last_push_step = self.global_step

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


# --- the worker actor ------------------------------------------------------------------------
@ray.remote(max_restarts=0)
class TrainWorker:
    """Worker ``rank``: a :class:`ShardedTrainer` on its own process (and GPU, if given)."""

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
        cfg = self.cfg
        group = None
        if self.world_size > 1:
            cuda = cfg.device != "cpu" and torch.cuda.is_available()
            if master_addr == "127.0.0.1":  # one node: keep the collectives on loopback
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
                os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=cfg.distributed.collective_timeout_s),
            )
            group = dist.new_group(backend="gloo") if cuda else None
        d = cfg.distributed
        store = ShardedStore(
            RayShards(self.shards),
            self.ds.num_items,
            d.partition_strategy,
            token=self.token,
            worker=self.rank,
            staleness=d.max_staleness if d.mode == "async" else 0,
        )
        self.trainer = ShardedTrainer(cfg, self.ds, store, self.rank, self.world_size, group)
        if load:
            self.trainer.load_checkpoint()
        return self.trainer.status()

    def run_epoch(self) -> list[tuple[float, int]]:
        return self.trainer.run_epoch()

    def finish_epoch(self, train_loss: float, seconds: float) -> dict:
        """Worker 0: validate, keep the best model, checkpoint (shards and trainer)."""
        start = time.perf_counter()
        valid = self.trainer.validate()
        self.trainer.end_epoch(train_loss, valid, seconds + time.perf_counter() - start)
        return self.trainer.status()

    def advance_epoch(self) -> None:
        self.trainer.advance_epoch()

    def status(self) -> dict:
        return self.trainer.status()

    def tower_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().cpu().reshape(-1) for p in self.trainer.tower.parameters()])

    def bench(self, steps: int, warmup: int) -> dict:
        """Run ``warmup`` then ``steps`` steps; per-phase seconds of the measured steps."""
        tr = self.trainer
        tr.run_epoch(max_steps=warmup)
        tr.times, tr.store.times = WorkerTimes(), StepTimes()
        tr.run_epoch(max_steps=steps)
        return {**tr.times.__dict__, **tr.store.times.__dict__}


# --- the driver ------------------------------------------------------------------------------
def _recoverable(error: BaseException) -> bool:
    if isinstance(error, (ShardFailure, RayActorError, ActorUnavailableError)):
        return True
    text = str(error)  # a worker whose peer died fails inside a collective
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def local_ray(num_cpus: int, **init_kwargs):
    """An embedded Ray on this machine only: every Ray process binds 127.0.0.1.

    Ray advertises the machine's network address even for a local instance; the setting it
    uses on Windows/macOS (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the Ray processes
    it starts and, already imported, by this one) makes it use the loopback address instead.
    Both are restored when Ray is shut down.
    """
    from ray._private import ray_constants

    old_env = os.environ.get(LOOPBACK_ENV)
    old_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
        yield
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = old_env


@contextlib.contextmanager
def ray_session(dist_cfg: DistributedConfig):
    """Use the Ray this process is connected to; else connect to ``ray_address`` (or the
    ``RAY_ADDRESS`` of a submitted job); else start an embedded Ray on 127.0.0.1 with this
    machine's CPUs. Disconnects (and stops the embedded Ray) on exit if it connected."""
    if ray.is_initialized():
        yield
        return
    address = dist_cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    cpus = os.cpu_count() or 1
    logger.info("starting an embedded Ray with %d CPUs on 127.0.0.1", cpus)
    with local_ray(cpus, log_to_driver=True):
        yield


@dataclass
class DistributedResult:
    """What a distributed run hands to evaluation and export (best epoch's model)."""

    cfg: TrainConfig
    dataset: Dataset
    tower: UserTower
    tables: dict[str, torch.Tensor]
    curves: list[dict]
    best_epoch: int
    recoveries: int
    global_step: int


class _Run:
    """The driver's view of one run: actors, the current token, rollbacks."""

    def __init__(self, cfg: TrainConfig, ds: Dataset) -> None:
        self.cfg = cfg
        self.d = cfg.distributed
        self.ds = ds
        self.out = Path(cfg.out_dir)
        self.token = 0
        self.recoveries = 0
        self.name = f"shardrec-{uuid.uuid4().hex[:8]}"
        self.shards: list = []
        self.workers: list = []
        res = ray.cluster_resources()
        self.plan = plan_resources(self.d, res.get("CPU", 0.0), res.get("GPU", 0.0), cfg.device)
        worker_cfg = cfg.model_copy(update={"progress": False})
        if self.plan.worker_gpus == 0 and cfg.device == "auto":
            worker_cfg = worker_cfg.model_copy(update={"device": "cpu"})
        self.worker_cfg_json = worker_cfg.to_json()
        self.ds_ref = ray.put(ds)
        self.log_level = logging.getLogger("trainer").getEffectiveLevel()

    # checkpoints
    def checkpoint_step(self) -> int:
        """The step of ``checkpoint.pt`` (0: none), after checking it fits this run."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True, mmap=True)
        check_ref(state["store"], self.d.num_shards, self.ds.num_items, self.d.partition_strategy)
        if state.get("world_size") != self.d.num_workers:
            raise ValueError(
                f"checkpoint {path} was written by {state.get('world_size')} workers, this run "
                f"has {self.d.num_workers}; resume with --num-workers {state.get('world_size')}."
            )
        return int(state["global_step"])

    def start(self, resume: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(self.cfg.to_json())
        step = self.checkpoint_step() if resume else 0
        if step == 0:  # stale files of an earlier run must never be restored into this one
            shutil.rmtree(self.out / SHARD_DIR, ignore_errors=True)
            for name in (CHECKPOINT, BEST):
                (self.out / name).unlink(missing_ok=True)
        logger.info(
            "%s: %d shards x %.2f CPUs, %d workers x %.2f CPUs%s, mode %s%s",
            self.name,
            self.d.num_shards,
            self.plan.shard_cpus,
            self.d.num_workers,
            self.plan.worker_cpus,
            f" + {self.plan.worker_gpus} GPU" if self.plan.worker_gpus else "",
            self.d.mode,
            f", resuming from step {step}" if step else "",
        )
        self.shards = create_shard_actors(
            self.d.num_shards,
            self.ds.num_items,
            self.cfg.model,
            self.cfg.optim,
            self.d.partition_strategy,
            self.cfg.seed,
            self.d.num_workers,
            self.d.mode,
            self.out,
            self.plan.shard_cpus,
            self.d.max_restarts,
            self.name,
        )
        self.restore_shards(step)
        self.start_workers(load=step > 0)

    def restore_shards(self, step: int) -> None:
        self.token += 1
        ray.get([s.restore.remote(self.token, "ckpt", step) for s in self.shards])

    def start_workers(self, load: bool) -> None:
        n = self.d.num_workers
        self.workers = [
            TrainWorker.options(
                num_cpus=self.plan.worker_cpus,
                num_gpus=self.plan.worker_gpus,
                name=f"{self.name}-worker-{r}",
            ).remote(
                self.worker_cfg_json,
                self.ds_ref,
                r,
                n,
                self.shards,
                self.token,
                self.log_level,
            )
            for r in range(n)
        ]
        addr, port = "127.0.0.1", 0
        if n > 1:
            nodes = ray.get([w.node.remote() for w in self.workers])
            if len({node for node, _ in nodes}) > 1:
                addr = nodes[0][1]
            port = ray.get(self.workers[0].free_port.remote(addr))
        self.wait_all([w.setup.remote(addr, port, load) for w in self.workers])

    def kill_workers(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []

    def shutdown(self) -> None:
        self.kill_workers()
        for s in self.shards:
            ray.kill(s, no_restart=True)
        self.shards = []

    # failures
    def wait_all(self, futures: list) -> list:
        """Results of ``futures``, raising the first failure as soon as it happens."""
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        return ray.get(futures)

    def recover(self, error: BaseException) -> None:
        """Roll every shard and worker back to ``checkpoint.pt``'s step, or raise."""
        if self.recoveries >= self.d.max_recoveries:
            raise RuntimeError(
                f"training failed ({type(error).__name__}: {error}) after {self.recoveries} "
                f"recoveries (distributed.max_recoveries={self.d.max_recoveries}); fix the cause "
                f"and resume with --resume."
            ) from error
        self.recoveries += 1
        self.kill_workers()
        infos = ray.get([s.info.remote() for s in self.shards], timeout=self.d.restart_timeout_s)
        step = self.checkpoint_step()
        reached = max(i["applied"] for i in infos)
        redo = f"redoing steps {step + 1}-{reached}" if reached > step else "nothing to redo"
        restarted = [i for i in infos if i["token"] != self.token]
        for i in restarted:
            logger.warning(
                "shard %d restarted, restored step %d; rolling every shard and worker back to "
                "the common checkpoint at step %d; %s",
                i["shard"],
                i["restored_step"],
                step,
                redo,
            )
        if not restarted:
            logger.warning(
                "%s: %s; rolling back to the checkpoint at step %d; %s",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
                step,
                redo,
            )
        self.restore_shards(step)
        self.start_workers(load=step > 0)

    # the loop
    def train(self) -> dict:
        while True:
            try:
                status = ray.get(self.workers[0].status.remote())
                if status["done"]:
                    return status
                start = time.perf_counter()
                logs = self.wait_all([w.run_epoch.remote() for w in self.workers])
                train_loss = combine_epoch_losses(logs)
                seconds = time.perf_counter() - start
                self.wait_all([self.workers[0].finish_epoch.remote(train_loss, seconds)])
                if len(self.workers) > 1:
                    self.wait_all([w.advance_epoch.remote() for w in self.workers[1:]])
                    self.check_towers()
            except Exception as e:  # classified by roll_back
                self.roll_back(e)

    def roll_back(self, error: BaseException) -> None:
        """Recover from ``error`` (and from failures during the recovery itself), or raise."""
        while True:
            if not _recoverable(error):
                raise error
            try:
                self.recover(error)
                return
            except Exception as again:
                error = again

    def check_towers(self) -> None:
        vectors = self.wait_all([w.tower_vector.remote() for w in self.workers])
        worst = max(float((v - vectors[0]).abs().max()) for v in vectors[1:])
        if worst > 1e-5:
            raise RuntimeError(
                f"the workers' dense towers diverged (max difference {worst:.3g}, expected "
                f"<= 1e-5); the all-reduce is not keeping them in sync."
            )

    def best_model(self, status: dict) -> DistributedResult:
        """Load the best epoch's shards and tower (the current state if none was saved)."""
        self.kill_workers()
        store = ShardedStore(
            RayShards(self.shards),
            self.ds.num_items,
            self.d.partition_strategy,
            token=self.token,
        )
        tower = build_tower(self.cfg, self.ds)
        path = self.out / (BEST if (self.out / BEST).exists() else CHECKPOINT)
        state = torch.load(path, weights_only=True)
        tower.load_state_dict(state["tower"])
        store.restore_shards(state["store"])
        return DistributedResult(
            self.cfg,
            self.ds,
            tower,
            store.full_tables(),
            status["curves"],
            status["best_epoch"],
            self.recoveries,
            status["global_step"],
        )


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute ``out_dir`` (actors may run in another working directory)."""
    return cfg.model_copy(update={"out_dir": Path(cfg.out_dir).expanduser().resolve()})


def train_distributed(
    cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None
) -> DistributedResult:
    """Train with Ray (see the module docstring); returns the best epoch's model."""
    cfg = resolve_paths(cfg)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    with ray_session(cfg.distributed):
        run = _Run(cfg, ds)
        try:
            run.start(resume)
            status = run.train()
            result = run.best_model(status)
        finally:
            run.shutdown()
    logger.info(
        "best %s %.4f at epoch %d (%d steps, %d recoveries)",
        cfg.monitor,
        status["best"],
        status["best_epoch"] + 1,
        status["global_step"],
        run.recoveries,
    )
    return result


def run_distributed(cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None) -> Path:
    """:func:`trainer.pipeline.run_training` for Ray: train, test metrics, export. Returns the
    artifact directory (``<out_dir>/artifacts``)."""
    from trainer.pipeline import format_table, test_metrics

    start = time.perf_counter()
    result = train_distributed(cfg, resume=resume, dataset=dataset)
    train_seconds = time.perf_counter() - start
    ds, tables = result.dataset, result.tables
    enc = UserEncoder(result.tower, tables.get("input", tables["output"]), ds.max_history)
    results = test_metrics(ds, score_function(enc, tables, ds), result.cfg.eval_ks)
    results["train_seconds"] = train_seconds
    results["best_epoch"] = result.best_epoch + 1
    results["recoveries"] = result.recoveries
    table = format_table({k: results[k] for k in ("model", "popularity")}, result.cfg.eval_ks)
    logger.info("test metrics:\n%s", table)
    return export_artifacts(
        Path(result.cfg.out_dir) / "artifacts",
        result.cfg,
        ds,
        enc.tower,
        tables,
        result.curves,
        results,
    )
