"""Our worker group vs Ray Train's ``TorchTrainer`` for the same sharded job: start-up and steps/s.

    PYTHONPATH=$PWD:<dir with pandas> python -m benchmarks.ray_train --workers 2 --shards 2

Both run the same :class:`~trainer.distributed.worker.ShardedTrainer` against the same shard
actors (:mod:`trainer.shards.actor`, created by the driver); what differs is who starts the
workers and their torch.distributed process group:

* ``ours``: :class:`~trainer.distributed.driver.RayRun` (``TrainWorker`` actors, a gloo group
  over ``tcp://`` on 127.0.0.1);
* ``Ray Train``: ``ray.train.torch.TorchTrainer`` (its controller, worker group and gloo group),
  with our training loop as ``train_loop_per_worker``.

``start-up``: seconds from the driver's start (shard actors included) until every worker is in
its process group with its trainer built; ``steps/s``: median step of worker 0 over ``--steps``
steps after ``--warmup``; ``total``: until the driver has every worker's result back.
Ray Train needs ``pandas`` (``pip install "ray[train]"``); the row says so when it is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.common import machine, table
from trainer.config import DistributedConfig, LossConfig, ModelConfig, TrainConfig
from trainer.data import DataConfig, SyntheticConfig, load_dataset
from trainer.distributed.driver import started_run
from trainer.distributed.session import local_ray
from trainer.shards.actor import create_shard_actors

HEADERS = ["worker group", "workers", "shards", "start-up s", "steps/s", "total s", "vs ours"]


def _rate(result: dict) -> float:
    return 1.0 / statistics.median(result["step_seconds"])


def run_ours(cfg: TrainConfig, ds, steps: int, warmup: int) -> dict:
    start = time.time()
    with started_run(cfg, ds) as run:
        ready = time.time()
        results = run.wait_all([w.bench.remote(steps, warmup) for w in run.workers])
        done = time.time()
    return {"startup": ready - start, "rate": _rate(results[0]), "total": done - start}


def _train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: our trainer in the group Ray Train set up."""
    import ray.train

    from trainer.config import config_from_json
    from trainer.distributed.worker import ShardedTrainer
    from trainer.shards.actor import RayShards, setup_actor_process
    from trainer.shards.client import ShardedStore

    setup_actor_process(logging.WARNING)  # one torch thread, as our TrainWorker sets up
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_json(config["cfg"])
    ds = ray.get(config["ds"])
    d = cfg.distributed
    store = ShardedStore(
        RayShards(config["shards"]), ds.num_items, d.partition_strategy, token=1, worker=rank
    )
    trainer = ShardedTrainer(cfg, ds, store, rank, world)
    ready = time.time()
    out = trainer.bench(config["steps"], config["warmup"])
    metrics = {"ready": ready, "rate": _rate(out)}
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train v2 keeps metrics with checkpoints
        (Path(tmp) / "bench.json").write_text(json.dumps(metrics))
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def run_ray_train(cfg: TrainConfig, ds, steps: int, warmup: int, storage: Path) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = cfg.distributed
    start = time.time()
    shards = create_shard_actors(
        d.num_shards,
        ds.num_items,
        cfg.model,
        cfg.optim,
        d.partition_strategy,
        cfg.seed,
        d.num_workers,
        d.mode,
        Path(cfg.out_dir),
        d.shard_cpus,
        0,
    )
    try:
        ray.get([s.restore.remote(1, "ckpt", 0) for s in shards])
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "cfg": cfg.to_json(),
                "ds": ray.put(ds),
                "shards": shards,
                "steps": steps,
                "warmup": warmup,
            },
            scaling_config=ScalingConfig(
                num_workers=d.num_workers, resources_per_worker={"CPU": 0.5}
            ),
            run_config=RunConfig(
                storage_path=str(storage), failure_config=FailureConfig(max_failures=0)
            ),
        )
        result = trainer.fit()
        if result.metrics is None:
            raise RuntimeError(f"Ray Train returned no metrics: {result.error!r}")
        done = time.time()
    finally:
        for s in shards:
            ray.kill(s, no_restart=True)
    return {
        "startup": result.metrics["ready"] - start,
        "rate": result.metrics["rate"],
        "total": done - start,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = {"num_items": 100_000, "batch": 512, "num_sampled": 1024, "steps": 20}
    defaults |= {"warmup": 3, "workers": 2, "shards": 2, "repeats": 2}  # repeats: alternating
    for name, value in defaults.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)

    out = Path(tempfile.mkdtemp(prefix="bench-raytrain-"))
    users = max(200, (args.steps + args.warmup + 2) * args.batch // 20)
    cfg = TrainConfig(
        data=DataConfig(synthetic=SyntheticConfig(num_users=users, num_items=args.num_items)),
        model=ModelConfig(embedding_dim=64),
        loss=LossConfig(num_sampled=args.num_sampled),
        batch_size=args.batch,
        device="cpu",
        progress=False,
        out_dir=out / "run",
        distributed=DistributedConfig(
            num_shards=args.shards,
            num_workers=args.workers,
            worker_cpus=0.5,
            shard_checkpoint_every=10**9,
        ),
    )
    ds = load_dataset(cfg.data)
    print(f"machine: {machine()}")
    print(
        f"{args.num_items:,} items, batch {args.batch}, {args.num_sampled} sampled, "
        f"{args.workers} workers, {args.shards} shards, {args.steps} steps after {args.warmup}"
    )
    rows: list[list] = []
    try:
        with local_ray(4, _system_config={"worker_niceness": 0}, log_to_driver=False):
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(run_ours(cfg, ds, args.steps, args.warmup))
                try:
                    theirs.append(run_ray_train(cfg, ds, args.steps, args.warmup, out / "rt"))
                except ImportError as e:
                    print(f"Ray Train unavailable: {e}")
        for name, runs in (("ours (RayRun)", ours), ("Ray Train TorchTrainer", theirs)):
            if not runs:
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = statistics.median(r["rate"] for r in ours)
            rows.append(
                [
                    name,
                    args.workers,
                    args.shards,
                    med["startup"],
                    med["rate"],
                    med["total"],
                    f"{med['rate'] / base:.2f}x",
                ]
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print()
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
