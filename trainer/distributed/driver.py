"""The driver of a Ray run: starts the shard and worker actors, runs the epochs, checks the
workers agree, and rolls every actor back to ``checkpoint.pt`` when one fails.

:func:`train_distributed` is the Ray backend of :func:`trainer.pipeline.run_training`;
:func:`bench_steps` times a run's steps for ``benchmarks.sharded``. See :mod:`trainer.distributed`
for the semantics.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from trainer.config import TrainConfig
from trainer.data import Dataset, load_dataset
from trainer.distributed.actors import TrainWorker
from trainer.distributed.placement import in_group, make_group, remove_group
from trainer.distributed.plan import (
    combine_epoch_losses,
    plan_resources,
    resolve_paths,
    worker_config,
)
from trainer.distributed.session import ray_session
from trainer.run_state import BEST, CHECKPOINT, RunState
from trainer.shards.actor import RayShards, create_shard_actors
from trainer.shards.client import ShardedStore, check_ref
from trainer.shards.server import SHARD_DIR, ShardFailure
from trainer.storage import run_storage
from trainer.train import TrainResult, build_tower

logger = logging.getLogger(__name__)


def _recoverable(error: BaseException) -> bool:
    if isinstance(error, (ShardFailure, RayActorError, ActorUnavailableError)):
        return True
    text = str(error)  # a worker whose peer died fails inside a collective
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))


class RayRun:
    """The driver's view of one run: actors, the current token, rollbacks.

    Call :meth:`start`, then :meth:`train` and :meth:`best_model` (or :meth:`bench`), and
    :meth:`shutdown` in the end (:func:`started_run` does the first and the last).
    """

    def __init__(self, cfg: TrainConfig, ds: Dataset) -> None:
        self.cfg = cfg
        self.d = cfg.distributed
        self.ds = ds
        self.root = run_storage(cfg)  # checkpoints: out_dir, or the storage path / URI
        self.token = 0
        self.recoveries = 0
        self.name = f"shardrec-{uuid.uuid4().hex[:8]}"
        self.shards: list = []
        self.workers: list = []
        self.shard_group = self.worker_group = None
        res = ray.cluster_resources()
        self.plan = plan_resources(self.d, res.get("CPU", 0.0), res.get("GPU", 0.0), cfg.device)
        self.worker_cfg_json = worker_config(cfg, self.plan).to_json()
        self.ds_ref = ray.put(ds)
        self.log_level = logging.getLogger("trainer").getEffectiveLevel()

    # checkpoints
    def checkpoint_step(self) -> int:
        """The step of ``checkpoint.pt`` (0: none), after checking it fits this run."""
        path = self.root / CHECKPOINT
        if not path.exists():
            return 0
        state = RunState.load(path, mmap=True)
        check_ref(state.store, self.d.num_shards, self.ds.num_items, self.d.partition_strategy)
        state.check_resumable(self.cfg, self.d.num_workers, path)
        return state.global_step

    def start(self, resume: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(self.cfg.to_json())
        step = self.checkpoint_step() if resume else 0
        if step == 0:  # stale files of an earlier run must never be restored into this one
            (self.root / SHARD_DIR).rmtree()
            for name in (CHECKPOINT, BEST):
                (self.root / name).unlink(missing_ok=True)
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
        self.shard_group = self.group([{"CPU": self.plan.shard_cpus}] * self.d.num_shards, "shards")
        self.shards = create_shard_actors(
            self.d.num_shards,
            self.ds.num_items,
            self.cfg.model,
            self.cfg.optim,
            self.d.partition_strategy,
            self.cfg.seed,
            self.d.num_workers,
            self.d.mode,
            self.root.uri(),
            self.plan.shard_cpus,
            self.d.max_restarts,
            self.name,
            lambda i: in_group(self.shard_group, i),
        )
        self.restore_shards(step)
        infos = ray.get([s.info.remote() for s in self.shards])
        logger.info("%s: shards on nodes %s", self.name, ", ".join(i["node"][:8] for i in infos))
        self.start_workers(load=step > 0)

    def restore_shards(self, step: int) -> None:
        self.token += 1
        ray.get([s.restore.remote(self.token, "ckpt", step) for s in self.shards])

    def group(self, bundles: list[dict], what: str):
        """A placement group for ``bundles`` (None with ``distributed.placement=none``)."""
        if self.d.placement == "none":
            return None
        return make_group(
            bundles, self.d.placement, f"{self.name}-{what}", self.d.restart_timeout_s
        )

    def start_workers(self, load: bool) -> None:
        """Start the workers in a new placement group over the nodes alive now."""
        n = self.d.num_workers
        bundle = {"CPU": self.plan.worker_cpus}
        if self.plan.worker_gpus:
            bundle["GPU"] = float(self.plan.worker_gpus)
        self.worker_group = self.group([bundle] * n, "workers")
        self.workers = [
            TrainWorker.options(
                num_cpus=self.plan.worker_cpus,
                num_gpus=self.plan.worker_gpus,
                name=f"{self.name}-worker-{r}",
                **in_group(self.worker_group, r),
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
        nodes = self.wait_all([w.node.remote() for w in self.workers])
        logger.info("%s: workers on nodes %s", self.name, ", ".join(node[:8] for node, _ in nodes))
        if n > 1:
            if len({node for node, _ in nodes}) > 1:
                addr = nodes[0][1]
            port = ray.get(self.workers[0].free_port.remote(addr))
        self.wait_all([w.setup.remote(addr, port, load) for w in self.workers])

    def kill_workers(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        remove_group(self.worker_group)
        self.worker_group = None

    def shutdown(self) -> None:
        self.kill_workers()
        for s in self.shards:
            ray.kill(s, no_restart=True)
        self.shards = []
        remove_group(self.shard_group)
        self.shard_group = None

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
        logger.info("%s: shards on nodes %s", self.name, ", ".join(i["node"][:8] for i in infos))
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

    def bench(self, steps: int, warmup: int) -> dict:
        """Worker 0's :meth:`~trainer.distributed.worker.ShardedTrainer.bench`."""
        return ray.get(self.workers[0].bench.remote(steps, warmup))

    def best_model(self, status: dict) -> TrainResult:
        """Load the best epoch's shards and tower (the current state if none was saved)."""
        self.kill_workers()
        store = ShardedStore(
            RayShards(self.shards),
            self.ds.num_items,
            self.d.partition_strategy,
            token=self.token,
        )
        tower = build_tower(self.cfg, self.ds)
        path = self.root / (BEST if (self.root / BEST).exists() else CHECKPOINT)
        state = RunState.load(path)
        tower.load_state_dict(state.tower)
        store.restore_shards(state.store)
        return TrainResult(
            self.cfg,
            self.ds,
            tower,
            store.full_tables(),
            status["curves"],
            status["best_epoch"],
            status["global_step"],
            self.recoveries,
        )


@contextlib.contextmanager
def started_run(cfg: TrainConfig, ds: Dataset, resume: bool = False):
    """A :class:`RayRun` with its actors started on the connected Ray; they are killed on exit."""
    run = RayRun(cfg, ds)
    try:
        run.start(resume)
        yield run
    finally:
        run.shutdown()


def train_distributed(
    cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None
) -> TrainResult:
    """Train with Ray (see :mod:`trainer.distributed`); returns the best epoch's model."""
    cfg = resolve_paths(cfg)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    with ray_session(cfg.distributed), started_run(cfg, ds, resume) as run:
        status = run.train()
        result = run.best_model(status)
    logger.info(
        "best %s %.4f at epoch %d (%d steps, %d recoveries)",
        cfg.monitor,
        status["best"],
        status["best_epoch"] + 1,
        status["global_step"],
        run.recoveries,
    )
    return result


def bench_steps(cfg: TrainConfig, ds: Dataset, steps: int, warmup: int) -> dict:
    """Per-phase seconds of worker 0 over ``steps`` steps after ``warmup`` steps, on a fresh
    run's actors on the connected Ray (see
    :meth:`~trainer.distributed.worker.ShardedTrainer.bench`)."""
    with started_run(cfg, ds) as run:
        return run.bench(steps, warmup)
