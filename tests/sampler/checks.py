"""Torch assertions shared by the CPU and CUDA sampler tests."""

from __future__ import annotations

import torch


def assert_reused_sampler_reproduces(smp, labels: torch.Tensor, num_true: int) -> None:
    """A sampler object used for other draws in between still gives the same draw per seed."""
    first = smp.sample(labels, num_true, 45, True, 5)
    for seed in range(20):
        smp.sample(labels, num_true, 45, True, 100 + seed)
        smp.sample(labels, num_true, 2, True, 200 + seed)
    again = smp.sample(labels, num_true, 45, True, 5)
    for u, v in zip(first, again):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
