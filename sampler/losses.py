"""Sampled softmax and NCE losses with the semantics of ``tf.nn.sampled_softmax_loss`` / ``nce_loss``.

Notation: ``B`` batch size, ``T`` = ``num_true``, ``S`` = ``num_sampled``, ``D`` embedding dim,
``C`` = ``num_classes``.

Differences from TensorFlow, all deliberate:

* Accidental hits are masked by setting the logit to the dtype's lowest finite value (after the
  logQ subtraction), instead of adding ``-FLT_MAX``. In float32 both give the same loss and
  gradients; in float16/bfloat16 ours stays finite.
* Losses of float16/bfloat16 inputs are computed and returned in float32.
* Gradients of ``nn.Parameter`` weights and biases are sparse COO tensors by default
  (``sparse_grad=None``; TensorFlow's ``IndexedSlices`` for a ``tf.Variable``): a step costs
  ``O((B*T + S) * D)`` memory instead of a dense ``[C, D]`` gradient. The documented step::

      emb = torch.nn.Parameter(torch.randn(C, D) * 0.01)
      bias = torch.nn.Parameter(torch.zeros(C))
      opt = sampler.SparseAdam([emb, bias], lr=1e-3)  # or torch's SparseAdam / SGD / Adagrad
      loss = sampled_softmax_loss(emb, bias, labels, user_vecs, 4096, C)
      loss.mean().backward(); opt.step(); opt.zero_grad()

  A dense-only optimizer meeting such a gradient raises a TypeError naming the fixes
  (:mod:`sampler.optim`); ``sparse_grad=False`` forces dense gradients, ``True`` sparse ones
  for any table that requires grad. Plain tensors (rows pulled or computed in the step) stay dense.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sampler._checks import (
    as_true_classes,
    check_float_tensor,
    check_ids_in_range,
    check_positive_int,
)
from sampler.candidate_sampling import (
    SampledValues,
    Seed,
    UniformSampler,
    accidental_hit_mask,
    accidental_hit_positions,
    log_uniform_candidate_sampler,
)
from sampler.embedding import Params, as_shards, lookup_weights_and_biases


class _SplitLogits(NamedTuple):
    true: torch.Tensor  # [B, T]
    sampled: torch.Tensor  # [B, S]
    hits: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None  # unmasked hits


def _check_sampled_values(sampled_values, num_sampled: int, batch: int, num_true: int, device):
    if not isinstance(sampled_values, (tuple, list)) or len(sampled_values) != 3:
        raise ValueError(
            "sampled_values must be a (sampled_candidates, true_expected_count, "
            f"sampled_expected_count) triple, got {type(sampled_values).__name__}"
            f"{' of length ' + str(len(sampled_values)) if isinstance(sampled_values, (tuple, list)) else ''}."
        )
    sampled, true_ec, sampled_ec = (torch.as_tensor(v, device=device) for v in sampled_values)
    if sampled.dim() != 1 or sampled.shape[0] != num_sampled:
        raise ValueError(
            f"sampled_values[0] (sampled_candidates) must have shape [num_sampled={num_sampled}], "
            f"got {list(sampled.shape)}."
        )
    if sampled.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sampled_values[0] must be int32/int64, got {sampled.dtype}.")
    if true_ec.shape != (batch, num_true):
        raise ValueError(
            f"sampled_values[1] (true_expected_count) must have shape [{batch}, {num_true}], "
            f"got {list(true_ec.shape)}."
        )
    if sampled_ec.shape != (num_sampled,):
        raise ValueError(
            f"sampled_values[2] (sampled_expected_count) must have shape [{num_sampled}], "
            f"got {list(sampled_ec.shape)}."
        )
    return SampledValues(sampled.long(), true_ec, sampled_ec)


def _sampled_logits(
    weights: Params,
    biases: Params,
    labels: torch.Tensor,
    inputs: torch.Tensor,
    num_sampled: int,
    num_classes: int,
    num_true: int,
    sampled_values,
    subtract_log_q: bool,
    remove_accidental_hits: bool,
    partition_strategy: str,
    seed: Seed,
    sparse_grad: bool | None,
    mask_in_logits: bool = True,
) -> _SplitLogits:
    """Validated core of :func:`compute_sampled_logits`; returns true and sampled logits apart.

    With ``mask_in_logits=False`` accidental hits are not written into the logits but returned
    (CPU: ``(rows, positions)``; CUDA: a ``[B, S]`` bool mask) for the loss to drop.
    """
    check_positive_int(num_sampled, "num_sampled")
    check_positive_int(num_classes, "num_classes")
    labels = as_true_classes(labels, num_true, "labels")
    inputs = check_float_tensor(inputs, "inputs")
    w_shards = as_shards(weights, "weights")
    b_shards = as_shards(biases, "biases")
    if inputs.dim() != 2:
        raise ValueError(f"inputs must have shape [batch_size, dim], got {list(inputs.shape)}.")
    batch, dim = inputs.shape
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels has {labels.shape[0]} rows but inputs has {batch}; they must match."
        )
    if w_shards[0].dim() != 2 or w_shards[0].shape[1] != dim:
        raise ValueError(
            f"weights must have shape [num_classes, dim={dim}] (dim of inputs), got row shape "
            f"{list(w_shards[0].shape[1:])}."
        )
    if b_shards[0].dim() != 1:
        raise ValueError(f"biases must have shape [num_classes], got {list(b_shards[0].shape)}.")
    w_rows = sum(s.shape[0] for s in w_shards)
    b_rows = sum(s.shape[0] for s in b_shards)
    if w_rows < num_classes or b_rows != w_rows:
        raise ValueError(
            f"weights and biases must hold the same number of rows, at least "
            f"num_classes={num_classes}; got {w_rows} weight rows and {b_rows} bias rows."
        )
    check_ids_in_range(labels, num_classes, "labels", f"num_classes is {num_classes}.")
    if w_shards[0].device != inputs.device or labels.device != inputs.device:
        raise ValueError(
            f"weights ({w_shards[0].device}), labels ({labels.device}) and inputs "
            f"({inputs.device}) must be on one device."
        )
    if sampled_values is None:
        sampled_values = log_uniform_candidate_sampler(
            labels, num_true, num_sampled, True, num_classes, seed=seed
        )
    sampled, true_ec, sampled_ec = _check_sampled_values(
        sampled_values, num_sampled, batch, num_true, inputs.device
    )
    check_ids_in_range(
        sampled, w_rows, "sampled_values[0] (sampled_candidates)", f"weights hold {w_rows} rows."
    )
    sampled, true_ec, sampled_ec = sampled.detach(), true_ec.detach(), sampled_ec.detach()

    all_w, all_b = lookup_weights_and_biases(
        w_shards,
        b_shards,
        torch.cat([labels.reshape(-1), sampled]),
        partition_strategy,
        sparse_grad,
    )
    all_w, all_b = all_w.to(inputs.dtype), all_b.to(inputs.dtype)
    n_true = batch * num_true
    true_w = all_w[:n_true].view(batch, num_true, dim)
    true_b = all_b[:n_true].view(batch, num_true)
    sampled_b = all_b[n_true:]
    if subtract_log_q:
        # Folded into the biases: one pass over [S] instead of over [B, S].
        true_b = true_b - _log_in(true_ec, true_b.dtype)
        sampled_b = sampled_b - _log_in(sampled_ec, sampled_b.dtype)
    true_logits = torch.baddbmm(true_b.unsqueeze(2), true_w, inputs.unsqueeze(2)).squeeze(2)
    sampled_logits = torch.addmm(sampled_b, inputs, all_w[n_true:].t())
    if remove_accidental_hits:
        hits = _hits(labels, sampled)
        if not mask_in_logits:
            return _SplitLogits(true_logits, sampled_logits, hits)
        # In place: addmm's backward does not need its output.
        _fill_hits(sampled_logits, hits, torch.finfo(sampled_logits.dtype).min)
    return _SplitLogits(true_logits, sampled_logits)


def _hits(labels: torch.Tensor, sampled: torch.Tensor):
    """Accidental hits as ``(rows, positions)`` on CPU (cheapest there), or as a ``[B, S]``
    bool mask elsewhere (a fixed shape: no data-dependent size, so no host sync on CUDA)."""
    if sampled.device.type == "cpu":
        return accidental_hit_positions(labels, sampled)
    return accidental_hit_mask(labels, sampled)


def _fill_hits(t: torch.Tensor, hits, value: float) -> None:
    """Write ``value`` in place at the hits of ``t`` [B, S] (either form of :func:`_hits`)."""
    if isinstance(hits, torch.Tensor):
        t.masked_fill_(hits, value)
    else:
        t.index_put_(hits, torch.tensor(value, dtype=t.dtype, device=t.device))


def compute_sampled_logits(
    weights: Params,
    biases: Params,
    labels: torch.Tensor,
    inputs: torch.Tensor,
    num_sampled: int,
    num_classes: int,
    num_true: int = 1,
    sampled_values=None,
    subtract_log_q: bool = True,
    remove_accidental_hits: bool = False,
    partition_strategy: str = "mod",
    seed: Seed = None,
    sparse_grad: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorFlow's ``_compute_sampled_logits``: logits and soft labels of the sampled problem.

    Args:
        weights: ``[C, D]`` tensor or list of row shards ("mod"/"div" layout).
        biases: ``[C]`` tensor or list of row shards in the same layout.
        labels: int ``[B, T]`` (or ``[B]`` when T is 1), the true classes.
        inputs: float ``[B, D]`` (float32, float16 or bfloat16).
        num_sampled: ``S``, candidates sampled per batch (shared by all rows).
        num_classes: ``C``.
        num_true: ``T``.
        sampled_values: a :class:`SampledValues` triple; None samples with the unique
            log-uniform sampler (TensorFlow's default).
        subtract_log_q: subtract ``log(expected_count)`` (the logQ correction).
        remove_accidental_hits: mask sampled candidates that equal one of the row's labels.
        partition_strategy: "mod" or "div" for sharded weights and biases.
        seed: int, ``torch.Generator`` or None; used only when sampling.
        sparse_grad: sparse COO gradients for weights and biases (see the module docstring);
            None (the default) makes them sparse for ``nn.Parameter`` tables, dense for other
            tensors.

    Returns:
        ``(logits [B, T + S], labels [B, T + S])`` in the dtype of ``inputs``; the true
        columns come first and their labels are ``1 / T``.
    """
    split = _sampled_logits(
        weights,
        biases,
        labels,
        inputs,
        num_sampled,
        num_classes,
        num_true,
        sampled_values,
        subtract_log_q,
        remove_accidental_hits,
        partition_strategy,
        seed,
        sparse_grad,
    )
    logits = torch.cat([split.true, split.sampled], 1)
    out_labels = torch.cat(
        [torch.full_like(split.true, 1.0 / num_true), torch.zeros_like(split.sampled)], 1
    ).detach()
    return logits, out_labels


def sampled_softmax_loss(
    weights: Params,
    biases: Params,
    labels: torch.Tensor,
    inputs: torch.Tensor,
    num_sampled: int,
    num_classes: int,
    num_true: int = 1,
    sampled_values=None,
    remove_accidental_hits: bool = True,
    partition_strategy: str = "mod",
    seed: Seed = None,
    sparse_grad: bool | None = None,
) -> torch.Tensor:
    """``tf.nn.sampled_softmax_loss``: softmax cross-entropy over the true and sampled classes.

    Arguments as :func:`compute_sampled_logits` (logQ correction always on).

    Returns:
        Per-example loss ``[B]`` (float32 for half-precision inputs).
    """
    split = _sampled_logits(
        weights,
        biases,
        labels,
        inputs,
        num_sampled,
        num_classes,
        num_true,
        sampled_values,
        True,
        remove_accidental_hits,
        partition_strategy,
        seed,
        sparse_grad,
        mask_in_logits=False,
    )
    true, sampled = _loss_precision(split.true), _loss_precision(split.sampled)
    return _SampledSoftmaxXent.apply(true, sampled, split.hits)


def nce_loss(
    weights: Params,
    biases: Params,
    labels: torch.Tensor,
    inputs: torch.Tensor,
    num_sampled: int,
    num_classes: int,
    num_true: int = 1,
    sampled_values=None,
    remove_accidental_hits: bool = False,
    partition_strategy: str = "mod",
    seed: Seed = None,
    sparse_grad: bool | None = None,
) -> torch.Tensor:
    """``tf.nn.nce_loss``: sigmoid cross-entropy, targets ``1/T`` for true classes, 0 for sampled.

    Arguments as :func:`compute_sampled_logits` (logQ correction always on).

    Returns:
        Per-example loss ``[B]``, summed over the ``T + S`` columns (float32 for half inputs).
    """
    split = _sampled_logits(
        weights,
        biases,
        labels,
        inputs,
        num_sampled,
        num_classes,
        num_true,
        sampled_values,
        True,
        remove_accidental_hits,
        partition_strategy,
        seed,
        sparse_grad,
    )
    true, sampled = _loss_precision(split.true), _loss_precision(split.sampled)
    true_loss = F.binary_cross_entropy_with_logits(
        true, torch.full_like(true, 1.0 / num_true), reduction="none"
    ).sum(1)
    # Sigmoid cross-entropy with target 0 is softplus(x).
    return true_loss + F.softplus(sampled).sum(1)


class _SampledSoftmaxXent(torch.autograd.Function):
    """Softmax cross-entropy over ``[true | sampled]`` columns, labels ``1/T`` on the true ones.

    Same value and gradient as ``-(labels * log_softmax(cat([true, sampled]))).sum(1)``, fused:
    no concatenated ``[B, T+S]`` copy, no dense label matrix, and the backward pass is one
    multiply of the saved exponentials.
    """

    @staticmethod
    def forward(ctx, true: torch.Tensor, sampled: torch.Tensor, hits=None) -> torch.Tensor:
        # An accidental hit's logit equals its row's true logit (same item, same expected
        # count), so including it in the max is harmless.
        m = torch.maximum(true.amax(1), sampled.amax(1)).unsqueeze(1)  # [B, 1]
        e_sampled = torch.sub(sampled, m).exp_()
        if hits is not None:  # removed hits: exp(-FLT_MAX - m) is exactly 0, as in TensorFlow
            _fill_hits(e_sampled, hits, 0.0)
        e_true = torch.exp(true - m)
        z = e_sampled.sum(1) + e_true.sum(1)  # [B]
        ctx.save_for_backward(e_true, e_sampled, z)
        ctx.consumed = False
        return m.squeeze(1) + torch.log(z) - true.mean(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError(
                "sampled_softmax_loss reuses its saved exponentials for the gradient and "
                "supports one backward pass; recompute the loss instead of retain_graph=True."
            )
        ctx.consumed = True
        e_true, e_sampled, z = ctx.saved_tensors
        scale = (grad / z).unsqueeze(1)
        grad_true = e_true * scale - (grad / e_true.shape[1]).unsqueeze(1)
        return grad_true, e_sampled.mul_(scale), None


def _log_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(t)`` in ``dtype`` as TensorFlow computes it; via float32 for half precision."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.log(t.float()).to(dtype)
    return torch.log(t.to(dtype))


def _loss_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


_REDUCTIONS = ("none", "mean", "sum")


class SampledSoftmaxLoss(nn.Module):
    """MindSpore's ``nn.SampledSoftmaxLoss``: the sampled softmax loss as a module.

    Args:
        num_sampled: candidates sampled per step (``<= num_classes``).
        num_classes: number of classes.
        num_true: true classes per example (``1 <= num_true <= num_classes``).
        sampled_values: fixed :class:`SampledValues` (tuple or list of 3) to use on every call,
            or None to sample as MindSpore does: the unique uniform sampler, which with
            ``remove_accidental_hits`` also avoids drawing the batch's true classes.
        remove_accidental_hits: mask sampled candidates equal to a true class.
        seed: seed of the module's own random stream (``>= 0``): a module built with the same
            seed draws the same sequence of candidates.
        reduction: "none" (``[B]``), "mean" or "sum".

    Shapes of ``forward(weights [C, D], biases [C], labels [B, T] or [B], inputs [B, D])``.
    """

    def __init__(
        self,
        num_sampled: int,
        num_classes: int,
        num_true: int = 1,
        sampled_values=None,
        remove_accidental_hits: bool = True,
        seed: int = 0,
        reduction: str = "none",
    ) -> None:
        super().__init__()
        if num_true < 1:
            raise ValueError(f"num_true must be greater than or equal to 1, but got {num_true}.")
        if seed < 0:
            raise ValueError(f"seed must be greater than or equal to 0, but got {seed}.")
        if num_sampled > num_classes:
            raise ValueError(
                f"num_sampled must be smaller than or equal to num_classes, but got "
                f"num_sampled {num_sampled} and num_classes {num_classes}."
            )
        if num_true > num_classes:
            raise ValueError(
                f"num_true must be smaller than or equal to num_classes, but got num_true "
                f"{num_true} and num_classes {num_classes}."
            )
        if sampled_values is not None:
            if not isinstance(sampled_values, (tuple, list)):
                raise TypeError(
                    "sampled_values must be a list or tuple, but got "
                    f"{type(sampled_values).__name__}."
                )
            if len(sampled_values) != 3:
                raise ValueError(
                    f"sampled_values must have length 3, but got {len(sampled_values)}."
                )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, but got {reduction!r}.")
        self.num_sampled = num_sampled
        self.num_classes = num_classes
        self.num_true = num_true
        self.sampled_values = sampled_values
        self.remove_accidental_hits = remove_accidental_hits
        self.seed = seed
        self.reduction = reduction
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def forward(self, weights, biases, labels, inputs) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "labels must be an int32 or int64 tensor, but got "
                f"{getattr(labels, 'dtype', type(labels).__name__)}."
            )
        sampled_values = self.sampled_values
        if sampled_values is None:
            sampled_values = UniformSampler(self.num_classes).sample(
                labels,
                self.num_true,
                self.num_sampled,
                True,
                seed=self._generator(inputs.device),
                avoid_true_classes=self.remove_accidental_hits,
            )
        loss = sampled_softmax_loss(
            weights,
            biases,
            labels,
            inputs,
            self.num_sampled,
            self.num_classes,
            num_true=self.num_true,
            sampled_values=sampled_values,
            remove_accidental_hits=self.remove_accidental_hits,
            seed=self._generator(inputs.device),
        )
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_sampled={self.num_sampled}, num_classes={self.num_classes}, "
            f"num_true={self.num_true}, reduction={self.reduction!r}"
        )
