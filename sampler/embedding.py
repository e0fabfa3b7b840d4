"""``embedding_lookup`` with TensorFlow's sharded layouts, and a gather with sparse gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sampler import routing
from sampler._checks import check_ids_in_range, check_int_tensor
from sampler.optim import note_default_sparse

Params = torch.Tensor | Sequence[torch.Tensor]


class _SparseGather(torch.autograd.Function):
    """``table[ids]`` whose gradient w.r.t. ``table`` is a sparse COO tensor (rows ``ids``).

    With ``coalesced=True`` the caller promises that ``ids`` are sorted and unique, and the
    gradient is marked coalesced. (PyTorch's AccumulateGrad rebuilds a sparse ``.grad`` without
    the flag; :class:`sampler.SparseAdam` checks the order itself instead of sorting.)
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, ids: torch.Tensor, coalesced: bool) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.table_shape = table.shape
        ctx.coalesced = coalesced
        return table.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(
            ids.unsqueeze(0),
            grad,
            ctx.table_shape,
            check_invariants=False,
            is_coalesced=ctx.coalesced,
        )
        return sparse, None, None


def gather_rows(
    table: torch.Tensor, ids: torch.Tensor, sparse_grad: bool = False, unique: bool = False
) -> torch.Tensor:
    """Rows ``ids`` [N] of ``table`` [R, ...] -> [N, ...]; sparse COO gradient if ``sparse_grad``.

    With ``sparse_grad=True`` the gradient costs ``O(N * row_size)`` instead of a dense
    ``[R, ...]`` tensor; optimizers that take sparse gradients: :class:`sampler.SparseAdam`
    (``torch.optim.SparseAdam``'s update, faster), ``torch.optim.SparseAdam``,
    ``torch.optim.SGD`` (no weight decay), ``torch.optim.Adagrad``. ``unique=True`` promises
    sorted unique ``ids``; the sparse gradient is then marked coalesced.
    """
    if sparse_grad and table.requires_grad:
        return _SparseGather.apply(table, ids, unique)
    return table.index_select(0, ids)


def wants_sparse_grad(sparse_grad: bool | None, params: Sequence[torch.Tensor]) -> bool:
    """Resolve ``sparse_grad=None`` (the losses' default): sparse for ``nn.Parameter`` tables.

    A parameter is the table an optimizer steps (TensorFlow's ``tf.Variable``, whose gradient
    is ``IndexedSlices``), so its gradient is sparse; rows that are computed or pulled in the
    step (plain tensors) get a dense gradient, as before.
    """
    if sparse_grad is None:
        return all(isinstance(p, torch.nn.Parameter) for p in params)
    return bool(sparse_grad)


def as_shards(params: Params, name: str = "params") -> list[torch.Tensor]:
    """Normalise a tensor or a list of row shards to a non-empty list and check it.

    Raises:
        TypeError/ValueError naming ``name`` when the shards are not tensors, differ in dtype,
        device or trailing shape, or do not form a "mod"/"div" layout.
    """
    shards = [params] if isinstance(params, torch.Tensor) else list(params)
    if not shards:
        raise ValueError(f"{name} must be a tensor or a non-empty list of shard tensors, got [].")
    for i, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(s).__name__}.")
        if s.dim() < 1:
            raise ValueError(f"{name}[{i}] must have at least 1 dimension, got a scalar.")
        if s.shape[1:] != shards[0].shape[1:] or s.dtype != shards[0].dtype:
            raise ValueError(
                f"{name} shards must share dtype and row shape: shard 0 is "
                f"{shards[0].dtype} {list(shards[0].shape[1:])}, shard {i} is "
                f"{s.dtype} {list(s.shape[1:])}."
            )
        if s.device != shards[0].device:
            raise ValueError(
                f"{name} shards must be on one device: shard 0 on {shards[0].device}, "
                f"shard {i} on {s.device}."
            )
    if len(shards) > 1:
        routing.check_shard_sizes([s.shape[0] for s in shards], name)
    return shards


def embedding_lookup(
    params: Params,
    ids: torch.Tensor,
    partition_strategy: str = "mod",
    max_norm: float | None = None,
    sparse_grad: bool = False,
    unique: bool = False,
) -> torch.Tensor:
    """``tf.nn.embedding_lookup`` (v1): rows ``ids`` of a table that may be split in row shards.

    Args:
        params: a tensor ``[num_rows, ...]`` or a list of shards in TensorFlow's "mod" or
            "div" layout (see :mod:`sampler.routing`; uneven shards allowed).
        ids: int32/int64 tensor of any shape, values in ``[0, num_rows)``.
        partition_strategy: "mod" or "div"; ignored for a single tensor.
        max_norm: if given, each looked-up row with a larger L2 norm is scaled to ``max_norm``.
        sparse_grad: return sparse COO gradients for the params (see :func:`gather_rows`).
        unique: ``ids`` are sorted and unique; sparse gradients are then marked coalesced
            (the local ids of each shard stay sorted and unique in both layouts).

    Returns:
        ``[*ids.shape, *params.shape[1:]]`` on the params' device.
    """
    shards = as_shards(params)
    routing.check_strategy(partition_strategy)
    ids = check_int_tensor(ids, "ids")
    if ids.device != shards[0].device:
        raise ValueError(
            f"ids are on {ids.device} but params on {shards[0].device}; move them to one device."
        )
    total = sum(s.shape[0] for s in shards)
    flat = ids.reshape(-1).long()
    check_ids_in_range(flat, total, "ids", f"params hold {total} rows.")
    if len(shards) == 1:
        rows = gather_rows(shards[0], flat, sparse_grad, unique)
    else:
        part = routing.partition(flat, total, len(shards), partition_strategy)
        pieces = [
            gather_rows(s, loc, sparse_grad, unique) for s, loc in zip(shards, part.local_ids)
        ]
        rows = torch.cat(pieces).index_select(0, part.inverse)
    if max_norm is not None:
        rows = _clip_rows(rows, max_norm)
    return rows.reshape(*ids.shape, *shards[0].shape[1:])


def lookup_weights_and_biases(
    w_shards, b_shards, ids: torch.Tensor, partition_strategy: str, sparse_grad: bool | None
):
    """Rows ``ids`` [N] of the weights and biases: ``([N, D], [N])``.

    Sparse gradients (see :func:`wants_sparse_grad`) are taken w.r.t. the
    unique ids only, so they come coalesced: an optimizer neither sorts nor sums duplicates.
    """
    sparse_w = wants_sparse_grad(sparse_grad, w_shards)
    sparse_b = wants_sparse_grad(sparse_grad, b_shards)
    if not (sparse_w or sparse_b):
        return (
            embedding_lookup(w_shards, ids, partition_strategy),
            embedding_lookup(b_shards, ids, partition_strategy),
        )
    if sparse_grad is None:  # the default: name the loss if a dense-only optimizer meets it
        for t in [*(w_shards if sparse_w else ()), *(b_shards if sparse_b else ())]:
            note_default_sparse(t)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    w = embedding_lookup(w_shards, uniq, partition_strategy, sparse_grad=sparse_w, unique=True)
    b = embedding_lookup(b_shards, uniq, partition_strategy, sparse_grad=sparse_b, unique=True)
    return w.index_select(0, inverse), b.index_select(0, inverse)


def _clip_rows(rows: torch.Tensor, max_norm: float) -> torch.Tensor:
    if rows.dim() == 1:
        norms = rows.abs()
    else:
        norms = rows.flatten(1).norm(dim=1).view(-1, *([1] * (rows.dim() - 1)))
    scale = torch.clamp(max_norm / norms.clamp(min=torch.finfo(rows.dtype).tiny), max=1.0)
    return rows * scale
