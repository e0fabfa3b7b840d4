"""Sampled softmax: ours vs TensorFlow's op vs a full softmax, a whole training step each.

    python -m benchmarks.loss                      # the issue's shapes: 1M classes, dim 64, ...
    python -m benchmarks.loss --device cuda        # on a GPU (absolute numbers; TF is CPU-only)
    python -m benchmarks.loss --num-classes 20000 --steps 3   # a quick run

Every row is a training step as a user writes it (loss, backward, optimizer step on
``nn.Parameter`` / ``tf.Variable`` tables of ``[num_classes, dim]``), measured in this process
with the same shapes. Ratios are against TensorFlow's ``tf.nn.sampled_softmax_loss`` under
``GradientTape`` + Keras SGD compiled with ``tf.function`` (SGD applies its ``IndexedSlices``
as a scatter; Keras Adam densifies them, shown for reference), and against the floor: the
step's three ``[B x D] x [D x S]``-sized matrix products timed alone.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import sampler
from benchmarks.common import machine, table, time_call


def _tables(args, device):
    weights = torch.nn.Parameter(torch.randn(args.num_classes, args.dim, device=device) * 0.01)
    biases = torch.nn.Parameter(torch.zeros(args.num_classes, device=device))
    return weights, biases


def _ours(args, device, opt_cls, sparse_grad=None):
    """A training step as the README writes it: loss, backward, optimizer step."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights, biases = _tables(args, device)
    inputs = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device, generator=gen)
    opt = opt_cls([weights, biases], lr=1e-3)

    def step():
        loss = sampler.sampled_softmax_loss(
            weights,
            biases,
            labels,
            inputs,
            args.num_sampled,
            args.num_classes,
            seed=gen,
            sparse_grad=sparse_grad,
        ).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        inputs.grad = None

    return step


def _matmul_floor(args, device):
    """The step's three products: logits, and the gradients of the inputs and sampled rows."""
    x = torch.randn(args.batch, args.dim, device=device)
    rows = torch.randn(args.num_sampled, args.dim, device=device)
    g = torch.randn(args.batch, args.num_sampled, device=device)

    def step():
        torch.mm(x, rows.t()), torch.mm(g, rows), torch.mm(g.t(), x)

    return step


def _full_softmax(args, device):
    weights, biases = _tables(args, device)
    inputs = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    opt = torch.optim.SGD([weights, biases], lr=1e-3)

    def step():
        F.cross_entropy(torch.addmm(biases, inputs, weights.t()), labels).backward()
        opt.step()
        weights.grad = biases.grad = inputs.grad = None

    return step


def _tf_steps(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        return None
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    rng = np.random.default_rng(0)
    weights = tf.Variable(rng.standard_normal((args.num_classes, args.dim), np.float32) * 0.01)
    biases = tf.Variable(np.zeros(args.num_classes, np.float32))
    inputs = tf.Variable(rng.standard_normal((args.batch, args.dim), np.float32))
    labels = tf.constant(rng.integers(0, args.num_classes, (args.batch, 1)), tf.int64)

    def make_step(opt):
        def train():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(
                    tf.nn.sampled_softmax_loss(
                        weights, biases, labels, inputs, args.num_sampled, args.num_classes
                    )
                )
            grads = tape.gradient(loss, [weights, biases])
            opt.apply_gradients(zip(grads, [weights, biases]))
            return loss

        return train

    eager = make_step(tf.keras.optimizers.SGD(1e-3))
    graph_sgd = tf.function(make_step(tf.keras.optimizers.SGD(1e-3)))
    graph_adam = tf.function(make_step(tf.keras.optimizers.Adam(1e-3)))

    def sample():
        return tf.random.log_uniform_candidate_sampler(
            labels, 1, args.num_sampled, True, args.num_classes
        )[0].numpy()

    return {
        "eager, SGD": lambda: eager().numpy(),
        "tf.function, SGD": lambda: graph_sgd().numpy(),
        "tf.function, Adam": lambda: graph_adam().numpy(),
    }, sample


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num-sampled", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--full-steps", type=int, default=3, help="steps for the full softmax")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-tf", action="store_true", help="skip TensorFlow")
    p.add_argument("--threads", type=int, default=0, help="threads of both frameworks (0: theirs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = device.type == "cuda"

    times: dict[str, float] = {}
    times["ours, default call + sampler.SparseAdam"] = time_call(
        _ours(args, device, sampler.SparseAdam), args.steps, sync=sync
    )
    times["ours, default call + torch.optim.SGD"] = time_call(
        _ours(args, device, torch.optim.SGD), args.steps, sync=sync
    )
    times["ours, default call + torch.optim.SparseAdam"] = time_call(
        _ours(args, device, torch.optim.SparseAdam), args.steps, sync=sync
    )
    times["ours, sparse_grad=False (dense [C, D]) + SGD"] = time_call(
        _ours(args, device, torch.optim.SGD, False), args.steps, sync=sync
    )
    floor = time_call(_matmul_floor(args, device), args.steps, sync=sync)
    times["floor: the three matrix products alone"] = floor
    full = time_call(_full_softmax(args, device), args.full_steps, warmup=1, sync=sync)
    times["full softmax (PyTorch) + SGD"] = full
    tf_steps = None if args.no_tf or device.type != "cpu" else _tf_steps(args)
    tf_ref = None
    if tf_steps is not None:
        tf_runs, tf_sample = tf_steps
        for name, fn in tf_runs.items():
            n = max(3, args.steps // 4) if "Adam" in name else args.steps
            times[f"TensorFlow sampled_softmax_loss ({name})"] = time_call(fn, n)
        tf_ref = times["TensorFlow sampled_softmax_loss (tf.function, SGD)"]

    rows = []
    for name, t in times.items():
        rows.append([name, t * 1e3, "-" if tf_ref is None else t / tf_ref, t / floor])
    shapes = (
        f"num_classes {args.num_classes:,}, dim {args.dim}, batch {args.batch}, "
        f"num_sampled {args.num_sampled}, device {device.type}"
    )
    out = [
        f"Training step: loss + backward + optimizer step ({shapes})",
        f"Machine: {machine()}",
        "",
    ]
    headers = ["implementation", "ms/step", "x TF tf.function SGD step", "x matmul floor"]
    out.append(table(headers, rows))

    labels = torch.randint(0, args.num_classes, (args.batch, 1), device=device)
    ours_sample = time_call(
        lambda: sampler.log_uniform_candidate_sampler(
            labels, 1, args.num_sampled, True, args.num_classes
        ),
        args.steps * 5,
        sync=sync,
    )
    srows = [["ours log_uniform_candidate_sampler", ours_sample * 1e3, "-"]]
    if tf_steps is not None:
        tf_s = time_call(tf_sample, args.steps * 5)
        srows[0][2] = ours_sample / tf_s
        srows.append(["TensorFlow log_uniform_candidate_sampler", tf_s * 1e3, 1.0])
    out += [
        "",
        f"Unique log-uniform sampler alone ({args.num_sampled} of {args.num_classes:,})",
        "",
    ]
    out.append(table(["implementation", "ms/call", "x TF time"], srows))
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
