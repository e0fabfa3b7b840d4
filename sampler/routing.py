"""Routing of global row ids to row shards, with TensorFlow's "mod" and "div" layouts.

This module is pure (torch only, no Ray): `sampler.embedding_lookup` uses it for lists of weight
shards, and the trainer's sharded parameter server uses the same functions to decide which actor
owns which row, so a model trained sharded and one trained in one piece agree row for row.

Layouts, for ``num_rows`` ids split over ``num_shards`` shards (TensorFlow's
``embedding_lookup(partition_strategy=...)``):

* ``"mod"``: id ``i`` lives on shard ``i % num_shards`` at local row ``i // num_shards``.
* ``"div"``: ids are split in contiguous ranges; the first ``num_rows % num_shards`` shards
  hold one row more than the others.

Both layouts give shard ``p`` the same number of rows: ``num_rows // num_shards``, plus one
for the first ``num_rows % num_shards`` shards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PARTITION_STRATEGIES = ("mod", "div")


def check_strategy(partition_strategy: str) -> None:
    """Raise ValueError unless ``partition_strategy`` is "mod" or "div"."""
    if partition_strategy not in PARTITION_STRATEGIES:
        raise ValueError(
            f"partition_strategy must be one of {PARTITION_STRATEGIES}, got "
            f"{partition_strategy!r}; use 'mod' (id % num_shards) or 'div' (contiguous ranges)."
        )


def shard_sizes(num_rows: int, num_shards: int) -> list[int]:
    """Rows held by each shard for ``num_rows`` ids over ``num_shards`` shards (both layouts).

    Returns:
        A list of ``num_shards`` ints that sum to ``num_rows``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}.")
    base, extra = divmod(num_rows, num_shards)
    return [base + (1 if p < extra else 0) for p in range(num_shards)]


def check_shard_sizes(sizes: list[int], what: str = "params") -> int:
    """Check that ``sizes`` is a valid layout and return the total number of rows.

    TensorFlow's layouts require the first ``N % P`` shards to hold one row more than the rest.

    Raises:
        ValueError: naming the shard sizes that came and the sizes expected for their total.
    """
    total = int(sum(sizes))
    expected = shard_sizes(total, len(sizes))
    if list(sizes) != expected:
        raise ValueError(
            f"{what}: shard row counts {list(sizes)} do not form a 'mod'/'div' layout of "
            f"{total} rows over {len(sizes)} shards; expected {expected} (the first "
            f"{total % len(sizes)} shards one row larger). Split the table with "
            f"sampler.routing.split_rows()."
        )
    return total


class Routed(NamedTuple):
    """Where each id lives: ``shard[k]`` and ``local[k]`` for ``ids[k]`` (both int64, same shape)."""

    shard: torch.Tensor
    local: torch.Tensor


def route(ids: torch.Tensor, num_rows: int, num_shards: int, partition_strategy: str) -> Routed:
    """Map global ids to (shard, local row) with TensorFlow's arithmetic.

    Args:
        ids: int tensor of any shape, values in ``[0, num_rows)``.
        num_rows: total rows over all shards.
        num_shards: number of shards.
        partition_strategy: "mod" or "div".

    Returns:
        ``Routed(shard, local)``, int64 tensors shaped like ``ids``.
    """
    check_strategy(partition_strategy)
    ids = ids.long()
    if num_shards == 1:
        return Routed(torch.zeros_like(ids), ids)
    if partition_strategy == "mod":
        return Routed(ids % num_shards, ids // num_shards)
    per, extras = divmod(num_rows, num_shards)
    if per == 0:
        # Fewer rows than shards: every id i sits alone on shard i (TensorFlow divides by zero).
        return Routed(ids, torch.zeros_like(ids))
    shard = torch.maximum(ids // (per + 1), (ids - extras) // per)
    local = torch.where(shard < extras, ids % (per + 1), (ids - extras) % per)
    return Routed(shard, local)


def global_ids(
    shard: int, local: torch.Tensor, num_rows: int, num_shards: int, partition_strategy: str
) -> torch.Tensor:
    """Inverse of :func:`route` for one shard: the global ids of local rows ``local``."""
    check_strategy(partition_strategy)
    local = local.long()
    if num_shards == 1:
        return local
    if partition_strategy == "mod":
        return local * num_shards + shard
    per, extras = divmod(num_rows, num_shards)
    start = shard * per + min(shard, extras)
    return local + start


def split_rows(
    table: torch.Tensor, num_shards: int, partition_strategy: str = "mod"
) -> list[torch.Tensor]:
    """Split a full ``[num_rows, ...]`` table into per-shard tables in the given layout."""
    check_strategy(partition_strategy)
    num_rows = table.shape[0]
    sizes = shard_sizes(num_rows, num_shards)
    out = []
    for p, size in enumerate(sizes):
        rows = global_ids(
            p, torch.arange(size, device=table.device), num_rows, num_shards, partition_strategy
        )
        out.append(table[rows])
    return out


def join_rows(shards: list[torch.Tensor], partition_strategy: str = "mod") -> torch.Tensor:
    """Inverse of :func:`split_rows`: rebuild the full table from its shards."""
    num_rows = check_shard_sizes([s.shape[0] for s in shards], "shards")
    num_shards = len(shards)
    out = shards[0].new_empty((num_rows, *shards[0].shape[1:]))
    for p, part in enumerate(shards):
        rows = global_ids(
            p,
            torch.arange(part.shape[0], device=part.device),
            num_rows,
            num_shards,
            partition_strategy,
        )
        out[rows] = part
    return out


class Partition(NamedTuple):
    """Ids grouped by shard, and the maps between the caller's order and the shards' order.

    For ``N`` ids: ``local_ids[p]`` are the local rows requested from shard ``p`` (int64
    ``[n_p]``, in the order the ids came); ``order`` (int64 ``[N]``) says where row ``k`` of
    ``torch.cat(local_ids)`` stands among the ids (``ids[order]`` are the ids grouped by
    shard); ``inverse`` (int64 ``[N]``), its inverse permutation, puts per-shard results back:
    ``torch.cat(per_shard_results)[inverse]`` is in the order of the ids given to
    :func:`partition`.
    """

    local_ids: list[torch.Tensor]
    inverse: torch.Tensor
    order: torch.Tensor


def partition(
    ids: torch.Tensor, num_rows: int, num_shards: int, partition_strategy: str
) -> Partition:
    """Group flat ``ids`` [N] by shard.

    Returns:
        ``Partition(local_ids, inverse, order)``; gather each shard's rows for ``local_ids[p]``,
        concat them in shard order, and index with ``inverse`` to get rows in the order of
        ``ids`` (or scatter them to the positions ``order`` names).
    """
    flat = ids.reshape(-1).long()
    shard, local = route(flat, num_rows, num_shards, partition_strategy)
    if num_shards == 1:
        identity = torch.arange(flat.numel(), device=flat.device)
        return Partition([local], identity, identity)
    order = torch.argsort(shard, stable=True)
    counts = torch.bincount(shard, minlength=num_shards).tolist()
    local_ids = list(torch.split(local[order], counts))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Partition(local_ids, inverse, order)
