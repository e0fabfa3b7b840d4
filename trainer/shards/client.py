"""The trainer's client of the sharded store: one pull and one push per shard per step.

:class:`ShardedStore` has :class:`~trainer.embeddings.LocalStore`'s interface (``pull``,
``push``, ``full_tables``, ``state_dict``, ``load_state_dict``). It deduplicates a step's ids,
routes them with :func:`sampler.routing.partition`, and issues at once (futures) ONE pull to
each shard that holds some of them and ONE push to every shard (the pushes' payload is
serialised once and shared), then puts the rows back in place with the partition's ``order``.
It can prefetch the next step's rows. The transport (:class:`~trainer.shards.local.LocalShards`
or :class:`~trainer.shards.actor.RayShards`) is handed in. No Ray import here; see
:mod:`trainer.shards` for the consistency model and the shapes.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from sampler import routing

STORE_FORMAT = "sharded-v1"


@dataclass
class StepTimes:
    """Seconds spent by the client, summed over steps (see :meth:`ShardedStore.times`)."""

    pull: float = 0.0  # routing, issuing and reassembling pulls (client CPU)
    wait: float = 0.0  # blocked on shard replies (not hidden by prefetching)
    push: float = 0.0  # routing, scaling and issuing pushes (client CPU)
    pulls: int = 0
    prefetch_hits: int = 0
    rows: int = 0


@dataclass
class _Pending:
    ids: torch.Tensor  # the unique sorted ids requested
    inverse: torch.Tensor | None  # rows of ``ids`` -> the caller's order (None: the same)
    positions: list[torch.Tensor]  # per asked shard: where its rows go in ``ids``
    futures: list
    step: int

    def same_ids(self, flat: torch.Tensor) -> bool:
        asked = self.ids if self.inverse is None else self.ids[self.inverse]
        return asked.numel() == flat.numel() and torch.equal(asked, flat)


def _sorted_unique(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(unique ids, inverse)``; ``inverse`` is None when ``flat`` is already strictly
    increasing (the usual case: a step's ids come from ``torch.unique``), saving a sort."""
    if flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all()):
        return flat, None
    return torch.unique(flat, return_inverse=True)


def _read_only(array: np.ndarray) -> torch.Tensor:
    """A tensor view of an array Ray handed over (read-only: it is only read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


@dataclass
class _Push:
    step: int
    futures: list = field(default_factory=list)


class ShardedStore:
    """:class:`~trainer.embeddings.LocalStore`'s interface over ``P`` shards.

    Args:
        backend: :class:`~trainer.shards.actor.RayShards` or
            :class:`~trainer.shards.local.LocalShards`.
        num_rows: rows of every table (the number of items).
        partition_strategy: "mod" or "div" (as the shards were built).
        token: the run's current token (see :class:`~trainer.shards.server.ShardServer`).
        worker: this worker's rank (pushes are counted per worker).
        staleness: 0 for sync training; async: a pull for step t may miss pushes after step
            ``t - 1 - staleness``.
        timeout: seconds to wait for a shard's reply (None: forever).

    ``grad_scale`` multiplies pushed gradients (a worker's share of the global batch);
    ``times`` accumulates the client's time per phase.
    """

    def __init__(
        self,
        backend,
        num_rows: int,
        partition_strategy: str = "mod",
        token: int = 0,
        worker: int = 0,
        staleness: int = 0,
        timeout: float | None = None,
    ) -> None:
        routing.check_strategy(partition_strategy)
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}.")
        self.backend = backend
        self.num_shards = backend.num_shards
        self.num_rows = num_rows
        self.partition_strategy = partition_strategy
        self.token = token
        self.worker = worker
        self.staleness = staleness
        self.timeout = timeout
        self.grad_scale = 1.0
        self.last_push_step = 0
        self.times = StepTimes()
        self._prefetches: deque[_Pending] = deque()
        self._after_push: tuple[torch.Tensor, int] | None = None
        self._pushes: deque[_Push] = deque()

    # --- pulls ------------------------------------------------------------------------------
    def _issue_pull(self, ids: torch.Tensor, step: int) -> _Pending:
        start = time.perf_counter()
        flat = torch.as_tensor(ids).reshape(-1).long()
        uniq, inverse = _sorted_unique(flat)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.num_rows):
            raise ValueError(
                f"ids must be in [0, {self.num_rows}), got [{int(uniq[0])}, {int(uniq[-1])}]."
            )
        part = routing.partition(uniq, self.num_rows, self.num_shards, self.partition_strategy)
        need = step - 1 - self.staleness
        asked = [p for p, local in enumerate(part.local_ids) if local.numel()] or [0]
        futures = [
            self.backend.call(p, "pull", self.token, part.local_ids[p].numpy(), need) for p in asked
        ]
        positions = []
        if len(asked) > 1:  # rows of shard p fill positions order[offset_p : offset_p + n_p]
            positions = list(torch.split(part.order, [t.numel() for t in part.local_ids]))
            positions = [positions[p] for p in asked]
        self.times.pull += time.perf_counter() - start
        return _Pending(uniq, inverse, positions, futures, step)

    def _collect(self, pending: _Pending) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        results = self.backend.get(pending.futures, self.timeout)
        mid = time.perf_counter()
        self.times.wait += mid - start
        rows: dict[str, torch.Tensor] = {}
        for name in results[0]:
            if len(results) == 1:  # one shard: its rows are already in id order
                out = torch.from_numpy(np.array(results[0][name]))
            else:  # one copy: every shard's rows straight to their positions
                first = _read_only(results[0][name])
                out = first.new_empty((pending.ids.numel(), *first.shape[1:]))
                for pos, result in zip(pending.positions, results):
                    out.index_copy_(0, pos, _read_only(result[name]))
            rows[name] = out if pending.inverse is None else out.index_select(0, pending.inverse)
        self._reap(pending.step - 1 - self.staleness)
        self.times.pull += time.perf_counter() - mid
        self.times.pulls += 1
        self.times.rows += pending.ids.numel()
        return rows

    def prefetch(self, ids: torch.Tensor, step: int) -> None:
        """Start pulling ``ids`` for ``step`` now; the :meth:`pull` of the same ids collects it
        (prefetches are collected in the order they were issued)."""
        self._prefetches.append(self._issue_pull(ids, step))

    def prefetch_after_push(self, ids: torch.Tensor, step: int) -> None:
        """Pull ``ids`` for ``step`` as soon as the next :meth:`push` has been issued."""
        self._after_push = (torch.as_tensor(ids), step)

    def pull(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of ``ids`` (any shape, duplicates allowed), flattened: name -> ``[N, D]``.

        Collects the oldest prefetch if it is for these ids (other prefetches are dropped
        then); otherwise pulls for the step after the last push.
        """
        flat = torch.as_tensor(ids).reshape(-1).long()
        if self._prefetches:
            pending = self._prefetches.popleft()
            if pending.same_ids(flat):
                self.times.prefetch_hits += 1
                return self._collect(pending)
            self._prefetches.clear()
        return self._collect(self._issue_pull(flat, self.last_push_step + 1))

    # --- pushes -----------------------------------------------------------------------------
    def push(
        self,
        ids: torch.Tensor | dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        """Send row gradients of ``step``: one call per shard (every shard, even with no rows,
        so that it can count the step), without waiting for them to be applied.

        Args:
            ids: global ids ``[n]`` for all tables, or a dict table -> ids (duplicates summed).
            grads: table -> ``[n, D]`` (or ``[n]``) gradients, in the order of the ids.
            step: the global step (1-based).
        """
        start = time.perf_counter()
        per_ids: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_shards)]
        per_grads: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_shards)]
        for name, grad in grads.items():
            rows = torch.as_tensor(ids[name] if isinstance(ids, dict) else ids).long()
            grad = grad.detach().cpu().float()
            if grad.shape[0] != rows.numel():
                raise ValueError(
                    f"gradient of {name!r} has {grad.shape[0]} rows for {rows.numel()} ids; "
                    f"expected one gradient row per id."
                )
            uniq, inverse = _sorted_unique(rows)
            if inverse is not None:  # unsorted or duplicate ids: sum the gradients per id
                grad = grad.new_zeros((uniq.numel(), *grad.shape[1:])).index_add_(0, inverse, grad)
                rows = uniq
            if self.grad_scale != 1.0:
                grad = grad * self.grad_scale
            part = routing.partition(rows, self.num_rows, self.num_shards, self.partition_strategy)
            order_grad = grad if self.num_shards == 1 else grad.index_select(0, part.order)
            counts = [t.numel() for t in part.local_ids]
            for p, (local, g) in enumerate(zip(part.local_ids, torch.split(order_grad, counts))):
                per_ids[p][name] = local.numpy()
                per_grads[p][name] = g.contiguous().numpy()
        record = _Push(step)
        payload = self.backend.put(list(zip(per_ids, per_grads)))  # serialised once
        for p in range(self.num_shards):
            record.futures.append(
                self.backend.call(p, "push_part", self.token, self.worker, step, payload, p)
            )
        self._pushes.append(record)
        self.last_push_step = max(self.last_push_step, step)
        self.times.push += time.perf_counter() - start
        if self._after_push is not None:
            next_ids, next_step = self._after_push
            self._after_push = None
            self.prefetch(next_ids, next_step)

    def _reap(self, upto: int) -> None:
        """Collect the replies of pushes of steps <= ``upto`` (done by now), raising errors."""
        while self._pushes and self._pushes[0].step <= upto:
            self.backend.get(self._pushes.popleft().futures, self.timeout)

    def flush(self) -> None:
        """Wait until every push issued by this client is accepted by its shard."""
        start = time.perf_counter()
        while self._pushes:
            self.backend.get(self._pushes.popleft().futures, self.timeout)
        self.times.wait += time.perf_counter() - start

    def cancel_prefetch(self) -> None:
        self._prefetches.clear()
        self._after_push = None

    # --- whole tables and checkpoints -------------------------------------------------------
    def full_tables(self) -> dict[str, torch.Tensor]:
        """Every table, gathered from all shards (the only full gather): name -> ``[R, D]``."""
        self.flush()
        futures = [self.backend.call(p, "tables", self.token) for p in range(self.num_shards)]
        parts = self.backend.get(futures, self.timeout)
        return {
            name: routing.join_rows(
                [torch.from_numpy(np.array(part[name])) for part in parts], self.partition_strategy
            )
            for name in parts[0]
        }

    def save_shards(self, tag: str, step: int) -> dict:
        """Every shard writes its state at ``step`` (after all pushes of ``step``); returns the
        reference that a trainer checkpoint stores instead of the tables."""
        self.flush()
        futures = [
            self.backend.call(p, "save", self.token, tag, step) for p in range(self.num_shards)
        ]
        paths = self.backend.get(futures, self.timeout)
        return {
            "format": STORE_FORMAT,
            "tag": tag,
            "step": int(step),
            "num_shards": self.num_shards,
            "num_rows": self.num_rows,
            "partition_strategy": self.partition_strategy,
            "files": paths,
        }

    def restore_shards(self, ref: dict, token: int | None = None) -> None:
        """Every shard goes back to the state a :meth:`save_shards` reference names."""
        check_ref(ref, self.num_shards, self.num_rows, self.partition_strategy)
        self.cancel_prefetch()
        self._pushes.clear()
        token = self.token if token is None else token
        futures = [
            self.backend.call(p, "restore", token, ref["tag"], ref["step"])
            for p in range(self.num_shards)
        ]
        self.backend.get(futures, self.timeout)
        self.token = token
        self.last_push_step = int(ref["step"])

    def state_dict(self) -> dict:
        """A reference to shard checkpoints written now (tag ``ckpt``), not the tables."""
        return self.save_shards("ckpt", self.last_push_step)

    def load_state_dict(self, sd: dict) -> None:
        self.restore_shards(sd)


def check_ref(ref: dict, num_shards: int, num_rows: int, partition_strategy: str) -> None:
    """Raise ValueError unless ``ref`` is a shard-checkpoint reference for this layout."""
    if not isinstance(ref, dict) or ref.get("format") != STORE_FORMAT:
        got = sorted(ref) if isinstance(ref, dict) else type(ref).__name__
        raise ValueError(
            f"expected a sharded store reference (format {STORE_FORMAT!r}), got {got}; a "
            f"checkpoint of the in-process trainer cannot be resumed sharded. Start the sharded "
            f"run without --resume (or in a new out_dir)."
        )
    layout = (ref["num_shards"], ref["num_rows"], ref["partition_strategy"])
    if layout != (num_shards, num_rows, partition_strategy):
        raise ValueError(
            f"the checkpoint was written with (num_shards, num_rows, partition_strategy) = "
            f"{layout}, this run has {(num_shards, num_rows, partition_strategy)}; resume with "
            f"the same distributed.num_shards and partition_strategy."
        )
