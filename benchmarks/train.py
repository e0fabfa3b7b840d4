"""Training throughput: examples/s of the in-process trainer, sampled vs full softmax.

    python -m benchmarks.train                       # 1M items, dim 64, batch 512, 4096 sampled
    python -m benchmarks.train --num-items 100000    # a quicker run

Both rows run the same trainer (`trainer.step.train_step`: pull rows, user tower, loss, dense
Adam, row-wise Adam push) on the same synthetic data in this process; only the loss differs.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from benchmarks.common import machine, table
from trainer.config import load_config
from trainer.train import Trainer


def throughput(trainer: Trainer, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(examples/s, ms/step) over ``steps`` training steps after ``warmup`` steps."""
    order = trainer.epoch_order(0)
    bs = trainer.cfg.batch_size
    times = []
    for i in range(warmup + steps):
        positions = order[(i * bs) % (len(order) - bs) :][:bs]
        start = time.perf_counter()
        trainer.train_batch(positions)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    per_step = float(np.median(times))
    return bs / per_step, per_step * 1e3


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--num-users", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num-sampled", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--full-steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    common = [
        f"data.synthetic.num_items={args.num_items}",
        f"data.synthetic.num_users={args.num_users}",
        f"model.embedding_dim={args.dim}",
        "model.hidden=[256]",
        f"batch_size={args.batch}",
        f"loss.num_sampled={args.num_sampled}",
        f"device={args.device}",
        "progress=false",
        "out_dir=/tmp/shardrec-bench-train",
    ]
    sampled_cfg = load_config(None, common)
    trainer = Trainer(sampled_cfg)
    ds = trainer.ds
    rows = []
    ex_s, ms = throughput(trainer, args.steps)
    rows.append(["sampled softmax (ours)", ex_s, ms, 1.0])
    full = Trainer(load_config(None, [*common, "loss.kind=full"]), ds)
    full_ex_s, full_ms = throughput(full, args.full_steps, warmup=1)
    rows.append(["full softmax", full_ex_s, full_ms, full_ex_s / ex_s])
    head = (
        f"Training throughput: {ds.num_items:,} items, {ds.num_users:,} users, dim {args.dim}, "
        f"batch {args.batch}, num_sampled {args.num_sampled}, device {trainer.device.type}\n"
        f"Machine: {machine()}\n\n"
    )
    text = head + table(["loss", "examples/s", "ms/step", "x sampled throughput"], rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
