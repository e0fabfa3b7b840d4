"""Training throughput of the two user towers on the same data, in this process.

    python -m benchmarks.towers --config configs/ml-100k.yaml --data-dir ../shared/data/ml-100k
    python -m benchmarks.towers --config configs/ml-100k.yaml --data-dir ../shared/data/ml-100k model.use_user_features=false

Each row times ``--steps`` training steps (after ``--warmup``) of ``trainer.step.train_step``
with the config's tower settings, and counts examples as training targets: one per history
for the mean tower, every target of every window for the sequence tower (``batch_size``
windows a step; ``--sequence-batch`` overrides it). The ratio is against the mean tower,
measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from benchmarks.common import machine, table
from trainer.config import load_config
from trainer.data import load_dataset
from trainer.train import Trainer


def throughput(trainer: Trainer, steps: int, warmup: int) -> tuple[float, float]:
    """(examples/s, ms/step): medians over ``steps`` steps of the first epoch's order."""
    order, bs = trainer.epoch_order(0), trainer.cfg.batch_size
    times, examples = [], []
    n_batches = max(1, len(order) // bs)
    for i in range(warmup + steps):
        units = order[(i % n_batches) * bs :][:bs]
        start = time.perf_counter()
        trainer.train_batch(units)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            examples.append(trainer.examples_in(units))
    return float(np.sum(examples) / np.sum(times)), float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/ml-100k.yaml")
    p.add_argument("--data-dir", help="sets data.data_dir")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sequence-batch", type=int, help="batch_size of the sequence row")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for both rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    common = [*args.overrides, "progress=false", "out_dir=/tmp/shardrec-bench-towers"]
    if args.data_dir:
        common.append(f"data.data_dir={args.data_dir}")
    mean_cfg = load_config(args.config, [*common, "model.tower=mean"])
    seq = [*common, "model.tower=sequence"]
    if args.sequence_batch:
        seq.append(f"batch_size={args.sequence_batch}")
    seq_cfg = load_config(args.config, seq)
    ds = load_dataset(mean_cfg.data)
    rows = []
    base = None
    for name, cfg in (("mean (YouTube-DNN)", mean_cfg), ("sequence (self-attention)", seq_cfg)):
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, ds)
        ex_s, ms = throughput(trainer, args.steps, args.warmup)
        base = base or ex_s
        rows.append([name, cfg.batch_size, ex_s, ms, ex_s / base])
    head = (
        f"Training throughput by tower: {ds.name}, {ds.num_items:,} items, "
        f"{len(ds.train_positions):,} training targets, loss {mean_cfg.loss.kind} "
        f"(num_sampled {mean_cfg.loss.num_sampled}), dim {mean_cfg.model.embedding_dim}\n"
        f"Machine: {machine()}\n\n"
    )
    text = head + table(["tower", "batch", "examples/s", "ms/step", "x mean tower"], rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
