"""Sharded training on Ray vs the in-process trainer: examples/s and a per-step breakdown.

    python -m benchmarks.sharded --steps 30 --modes sync async --batch 512 4096   # the table
    python -m benchmarks.sharded --num-items 100000 --steps 10   # a quick run
    python -m benchmarks.sharded --shards 2 --depth 1 2 --no-prefetch

Every row trains the same synthetic data with the same config in this run: the in-process
:class:`trainer.train.Trainer`'s steps (one torch thread unless ``--threads``), and one Ray
trainer worker with 1, 2 and 4 shard actors on an embedded Ray (127.0.0.1), timed by
:func:`trainer.distributed.driver.bench_steps`. Each Ray row is compared with an in-process
measurement of the same batch size taken just before it (``vs in-process``; the in-process
rows pool them). ``examples/s`` comes from the median step time of ``--steps`` steps after
``--warmup`` steps; the phases are means per step (ms):

* ``prep``: building the batch and drawing negatives (overlaps the shards' work when sharded);
* ``pull`` / ``push``: client CPU for routing, issuing and reassembling (in process: the
  row gather / the row optimizer);
* ``compute``: forward, backward and the dense optimizer step;
* ``wait``: time blocked on shard replies that the pipeline did not hide;
* ``transfer``: the replies' latencies (issue to answer, hidden or not), and ``overlap`` =
  1 - wait / transfer, the fraction of the transfer time hidden behind other work.

Ray's actors run at niceness 0 here, like the in-process loop (Ray's default is 15).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, table
from trainer.config import DistributedConfig, LossConfig, ModelConfig, TrainConfig
from trainer.data import DataConfig, SyntheticConfig, load_dataset
from trainer.distributed.driver import bench_steps
from trainer.distributed.session import local_ray
from trainer.train import Trainer


class _TimedStore:
    """LocalStore proxy that times pulls and pushes."""

    def __init__(self, store) -> None:
        self.store, self.pull_s, self.push_s = store, 0.0, 0.0

    def pull(self, ids):
        start = time.perf_counter()
        rows = self.store.pull(ids)
        self.pull_s += time.perf_counter() - start
        return rows

    def push(self, ids, grads, step):
        start = time.perf_counter()
        self.store.push(ids, grads, step)
        self.push_s += time.perf_counter() - start


class InProcess:
    """The local trainer's steps (:meth:`Trainer.draw_batch` then :meth:`Trainer.train_on`),
    timed per phase; kept alive so that every Ray row is paired with an in-process
    measurement taken just before it."""

    def __init__(self, cfg: TrainConfig, ds) -> None:
        self.cfg, self.ds = cfg, ds
        self.trainer = Trainer(cfg, ds)
        self.store = self.trainer.store = _TimedStore(self.trainer.store)
        self.order = self.trainer.epoch_order(0)
        self.batches = len(self.order) // cfg.batch_size
        self.b = 0

    def measure(self, steps: int, warmup: int) -> dict:
        tr, store, bs = self.trainer, self.store, self.cfg.batch_size
        prep = compute = 0.0
        step_seconds = []
        for i in range(warmup + steps):
            if i == warmup:
                store.pull_s = store.push_s = prep = compute = 0.0
                step_seconds = []
            b = self.b % self.batches
            self.b += 1
            t0 = time.perf_counter()
            batch, negatives = tr.draw_batch(self.order[b * bs : (b + 1) * bs])
            t1 = time.perf_counter()
            inside = store.pull_s + store.push_s
            tr.train_on(batch, negatives)
            prep += t1 - t0
            compute += time.perf_counter() - t1 - (store.pull_s + store.push_s - inside)
            step_seconds.append(time.perf_counter() - t0)
        return {
            "steps": steps,
            "examples": steps * bs,
            "prepare": prep,
            "pull": store.pull_s,
            "compute": compute,
            "push": store.push_s,
            "wait": 0.0,
            "step_seconds": step_seconds,
        }


def merge(runs: list[dict]) -> dict:
    """Several measurements as one (sums, and all step times)."""
    out = {k: sum(r[k] for r in runs) for k in runs[0] if k != "step_seconds"}
    out["step_seconds"] = [x for r in runs for x in r["step_seconds"]]
    return out


def rate(t: dict) -> float:
    """Examples per second from the median step (robust to a busy machine's hiccups)."""
    return t["examples"] / t["steps"] / float(np.median(t["step_seconds"]))


HEADERS = ["trainer", "batch", "shards", "mode", "depth", "examples/s", "vs in-process"]
HEADERS += ["median step", "prep", "pull", "compute", "push", "wait", "transfer", "overlap"]


def row(name: str, batch: int, shards, mode: str, depth, t: dict, base: dict | None) -> list:
    ms = 1000.0 / t["steps"]
    transfer = t.get("transfer", 0.0)
    return [
        name,
        batch,
        shards,
        mode,
        depth,
        rate(t),
        "1.00x" if base is None else f"{rate(t) / rate(base):.2f}x",
        1000.0 * float(np.median(t["step_seconds"])),
        t["prepare"] * ms,
        t["pull"] * ms,
        t["compute"] * ms,
        t["push"] * ms,
        t["wait"] * ms,
        transfer * ms,
        f"{1.0 - t['wait'] / transfer:.0%}" if transfer > 0 else "-",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--num-sampled", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["sync"], choices=["sync", "async"])
    p.add_argument("--depth", type=int, nargs="+", default=[2], help="distributed.pipeline_depth")
    p.add_argument("--no-prefetch", action="store_true", help="also run without prefetching")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)

    batches = args.steps + args.warmup + 1
    users = max(200, math.ceil(batches * max(args.batch) / 25))
    syn = SyntheticConfig(num_users=users, num_items=args.num_items, seed=0)
    out = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    cfg = TrainConfig(
        data=DataConfig(synthetic=syn),
        model=ModelConfig(embedding_dim=args.dim),
        loss=LossConfig(num_sampled=args.num_sampled),
        device=args.device,
        progress=False,
        num_threads=args.threads,
        out_dir=out,
    )
    torch.set_num_threads(args.threads)
    ds = load_dataset(cfg.data)
    if len(ds.train_positions) < batches * max(args.batch):
        raise ValueError(
            f"{len(ds.train_positions)} training examples, {batches * max(args.batch)} needed; "
            f"lower --steps or --batch."
        )
    print(f"machine: {machine()}")
    print(
        f"{args.num_items:,} items, dim {args.dim}, {args.num_sampled} sampled, device "
        f"{args.device}, {args.steps} steps after {args.warmup} warm-up; ms per step"
    )
    try:
        rows = compare(args, cfg, ds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print()
    print(table(HEADERS, rows))


def compare(args, cfg: TrainConfig, ds) -> list[list]:
    """Per batch size, the in-process loop and the Ray rows, each Ray row paired with a fresh
    in-process baseline."""
    rows = []
    # Ray starts its workers at niceness 15; the in-process baseline runs at 0, so on a busy
    # machine the comparison would measure the scheduler. Give the actors the same priority.
    cpus = max(2, int(np.ceil(0.1 * max(args.shards) + 1)))
    with local_ray(cpus, _system_config={"worker_niceness": 0}):
        for batch in args.batch:
            bcfg = cfg.model_copy(update={"batch_size": batch})
            local = InProcess(bcfg, ds)
            base_runs, batch_rows = [], []
            for mode in args.modes:
                variants = [(True, d) for d in args.depth] + [(False, 1)] * args.no_prefetch
                for prefetch, depth in variants:
                    for num_shards in args.shards:
                        base_runs.append(local.measure(args.steps, args.warmup))
                        dist = DistributedConfig(
                            num_shards=num_shards,
                            mode=mode,
                            max_staleness=1,
                            prefetch=prefetch,
                            pipeline_depth=depth,
                            shard_checkpoint_every=10**9,
                        )
                        run_cfg = bcfg.model_copy(update={"distributed": dist, "num_threads": None})
                        t = bench_steps(run_cfg, ds, args.steps, args.warmup)  # 1 worker
                        name = "Ray, 1 worker"
                        shown = depth if prefetch else "off"
                        r = row(name, batch, num_shards, mode, shown, t, base_runs[-1])
                        batch_rows.append(r)
                        print(table(HEADERS, [r]).splitlines()[-1], flush=True)
            name = f"in-process ({args.threads} thr)"
            rows.append(row(name, batch, "-", "-", "-", merge(base_runs), None))
            rows.extend(batch_rows)
    return rows


if __name__ == "__main__":
    main()
