"""Row-wise optimizers for the sparse gradients of the sampled losses, and a clear error for
dense-only optimizers that meet them.

``sampled_softmax_loss(weights, ...)`` with an ``nn.Parameter`` table returns a sparse COO
gradient for the rows the step touched (TensorFlow's ``IndexedSlices``). :class:`SparseAdam`
applies ``torch.optim.SparseAdam``'s update (lazy Adam: only touched rows' moments move) with
row gathers and scatters, which on CPU is several times faster than PyTorch's generic sparse
ops; ``torch.optim.SGD`` and ``torch.optim.Adagrad`` take the same gradients.
"""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# PyTorch optimizers that reject sparse gradients with a message that does not say where the
# gradient came from; the hook below names the loss and the fixes first.
_DENSE_ONLY = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.Adadelta,
    torch.optim.ASGD,
)
_MARK = "_sampler_default_sparse"
_hook = None


def note_default_sparse(table: torch.Tensor) -> None:
    """Mark ``table`` as given a sparse gradient by default, for :func:`_check_step`.

    The first call registers a global optimizer step pre-hook; it only inspects optimizers
    of the dense-only kinds above.
    """
    global _hook
    setattr(table, _MARK, True)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_step)


def _check_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
    if not isinstance(opt, _DENSE_ONLY):
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse and getattr(p, _MARK, False):
                raise TypeError(
                    f"{type(opt).__name__} does not accept the sparse gradient that "
                    f"sampler's losses give an nn.Parameter table of shape {list(p.shape)} by "
                    "default (TensorFlow's IndexedSlices). Step that table with "
                    "sampler.SparseAdam (or torch.optim.SparseAdam, SGD, Adagrad) and the "
                    "other parameters with your optimizer, or pass sparse_grad=False to the "
                    "loss for a dense [num_classes, dim] gradient (much slower)."
                )


class SparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` (same arguments, state and update), applied row-wise.

    Each step gathers the moments of the gradient's rows, updates them in the same order of
    operations as PyTorch, and scatters them back: ``O(rows * D)`` work, no sparse-tensor
    arithmetic. Parameters must have sparse gradients (or none).
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "sampler.SparseAdam needs sparse gradients; got a dense one for a "
                        f"parameter of shape {list(p.shape)}. Use torch.optim.Adam for dense "
                        "parameters, or give the loss an nn.Parameter (or sparse_grad=True)."
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = -p.grad if group["maximize"] else p.grad
                rows, values = _unique_rows(grad)
                _adam_rows(p, rows, values, state, group["lr"], beta1, beta2, group["eps"])
        return loss


def _unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [N], values [N, ...])`` of a sparse COO gradient with sorted unique rows.

    The losses' gradients already have them (but lose the coalesced flag on the way to
    ``.grad``): one comparison pass instead of the sort of ``coalesce()``.
    """
    rows, values = grad._indices()[0], grad._values()
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return rows, values
    grad = grad.coalesce()
    return grad._indices()[0], grad._values()


def _adam_rows(p, rows, values, state, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """torch's ``sparse_adam`` for one parameter, as gathers and scatters of rows."""
    if values.numel() == 0:
        return
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    old_m = exp_avg.index_select(0, rows)
    m = values.sub(old_m).mul_(1 - beta1)  # the update; old + update as torch adds it
    exp_avg.index_add_(0, rows, m)
    old_v = exp_avg_sq.index_select(0, rows)
    v = values.pow(2).sub_(old_v).mul_(1 - beta2)
    exp_avg_sq.index_add_(0, rows, v)
    m.add_(old_m)
    v.add_(old_v)
    step = state["step"]
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)).mul_(-step_size))
