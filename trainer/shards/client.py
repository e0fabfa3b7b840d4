"""The trainer's client of the sharded store: one pull and one push per shard per step.

:class:`ShardedStore` has :class:`~trainer.embeddings.LocalStore`'s interface (``pull``,
``push``, ``full_tables``, ``state_dict``, ``load_state_dict``). It deduplicates a step's ids,
routes them with :func:`sampler.routing.partition`, and issues at once (futures) ONE pull to
each shard that holds some of them and ONE push to every shard (the pushes' payload is
serialised once and shared), then puts the rows back in place with the partition's ``order``.
It pipelines: pulls of the next steps are in flight while a step computes, refreshed with the
rows the pushes in between changed (:meth:`ShardedStore.prefetch`). The transport (:class:`~trainer.shards.local.LocalShards`
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
    wait: float = 0.0  # blocked on shard replies (not hidden by the pipeline)
    push: float = 0.0  # routing, scaling and issuing pushes (client CPU)
    transfer: float = 0.0  # the replies' latencies, issue to answer (hidden or not)
    pulls: int = 0
    prefetch_hits: int = 0
    refreshes: int = 0  # early pulls brought up to date by a refresh
    rows: int = 0
    refreshed_rows: int = 0

    @property
    def overlap(self) -> float:
        """The fraction of the transfer time hidden behind other work (1: all of it)."""
        return 1.0 - self.wait / self.transfer if self.transfer > 0 else 1.0


@dataclass
class _Pending:
    ids: torch.Tensor  # the unique sorted ids requested
    inverse: torch.Tensor | None  # rows of ``ids`` -> the caller's order (None: the same)
    asked: list[int]  # the shards asked
    positions: list[torch.Tensor]  # per asked shard: where its rows go in ``ids``
    futures: list
    step: int
    need: int  # the step the shards' answers reflect at least
    target: int  # the step the rows must reflect (sync: step - 1)
    request: tuple[int, int]
    issued: float  # wall-clock time of the pull
    refresh: list | None = None  # per asked shard: a future of [refresh answer]
    refresh_issued: float = 0.0

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


def _latency(issued: float, served: float, waited: float, got: float) -> float:
    """A reply's latency: until it was in hand when we waited for it, else until the shard
    answered (wall clock of the same host)."""
    return max(0.0, (got if waited > 1e-4 else served) - issued)


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
        pin_memory: put pulled rows in pinned memory (for ``non_blocking`` copies to a GPU).

    ``grad_scale`` multiplies pushed gradients (a worker's share of the global batch);
    ``times`` accumulates the client's time per phase.

    The pipeline: :meth:`prefetch` pulls a later step's rows *now*, from whatever the shards
    hold once this client's own last push is in; the push of the step the rows must reflect
    (``step - 1 - staleness``) then carries a refresh, answered in the same round trip with
    only the rows that changed since that pull (the shards keep a version per row). So a pull
    always sees exactly what the consistency model promises, however early it was issued.
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
        pin_memory: bool = False,
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
        self.pin_memory = pin_memory
        self.grad_scale = 1.0
        self.last_push_step = 0
        self.times = StepTimes()
        self._prefetches: deque[_Pending] = deque()
        self._pushes: deque[_Push] = deque()
        self._requests = 0

    # --- pulls ------------------------------------------------------------------------------
    def _issue_pull(self, ids: torch.Tensor, step: int, need: int) -> _Pending:
        start = time.perf_counter()
        flat = torch.as_tensor(ids).reshape(-1).long()
        uniq, inverse = _sorted_unique(flat)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.num_rows):
            raise ValueError(
                f"ids must be in [0, {self.num_rows}), got [{int(uniq[0])}, {int(uniq[-1])}]."
            )
        part = routing.partition(uniq, self.num_rows, self.num_shards, self.partition_strategy)
        target = step - 1 - self.staleness
        self._requests += 1
        request = (self.worker, self._requests)
        asked = [p for p, local in enumerate(part.local_ids) if local.numel()] or [0]
        issued = time.time()
        remember = request if need < target else None  # only an early pull is refreshed
        futures = [
            self.backend.call(p, "pull", self.token, part.local_ids[p].numpy(), need, remember)
            for p in asked
        ]
        positions = []
        if len(asked) > 1:  # rows of shard p fill positions order[offset_p : offset_p + n_p]
            positions = list(torch.split(part.order, [t.numel() for t in part.local_ids]))
            positions = [positions[p] for p in asked]
        self.times.pull += time.perf_counter() - start
        return _Pending(
            uniq, inverse, asked, positions, futures, step, need, target, request, issued
        )

    def _get(self, futures: list, issued: float, first: bool = False) -> list:
        """Replies ``(..., served time)`` (``first``: the first of each reply's list), timing
        the wait and the latency."""
        start = time.perf_counter()
        results = self.backend.get(futures, self.timeout)
        if first:
            results = [r[0] for r in results]
        waited = time.perf_counter() - start
        self.times.wait += waited
        served = max(r[-1] for r in results)
        self.times.transfer += _latency(issued, served, waited, time.time())
        return results

    def _refreshes(self, pending: _Pending) -> list:
        """Every asked shard's ``(positions, rows, time)`` since ``pending``'s pull."""
        if pending.target > self.last_push_step:
            raise RuntimeError(
                f"the rows of step {pending.step} must reflect step {pending.target}, but this "
                f"client pushed only up to step {self.last_push_step}; push step "
                f"{pending.target} before pulling step {pending.step}."
            )
        if pending.refresh is None:  # no push carried it: ask now
            pending.refresh_issued = time.time()
            pending.refresh = [
                self.backend.call(p, "refresh", self.token, pending.request, pending.target)
                for p in pending.asked
            ]
            return self._get(pending.refresh, pending.refresh_issued)
        return self._get(pending.refresh, pending.refresh_issued, first=True)

    def _collect(self, pending: _Pending) -> dict[str, torch.Tensor]:
        results = self._get(pending.futures, pending.issued)
        start = time.perf_counter()
        n = pending.ids.numel()
        rows: dict[str, torch.Tensor] = {}
        for name in results[0][0]:  # reassembled while the refresh may still be travelling
            first = _read_only(results[0][0][name])
            out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, pin_memory=self.pin_memory)
            if len(results) == 1:  # one shard: its rows are already in id order
                out.copy_(first)
            else:  # one copy: every shard's rows straight to their positions
                for pos, (result, _) in zip(pending.positions, results):
                    out.index_copy_(0, pos, _read_only(result[name]))
            rows[name] = out
        self.times.pull += time.perf_counter() - start
        if pending.need < pending.target:
            self._apply_refresh(pending, rows)
        start = time.perf_counter()
        if pending.inverse is not None:
            rows = {name: out.index_select(0, pending.inverse) for name, out in rows.items()}
        self._reap(pending.step - 1 - self.staleness)
        self.times.pull += time.perf_counter() - start
        self.times.pulls += 1
        self.times.rows += n
        return rows

    def _apply_refresh(self, pending: _Pending, rows: dict[str, torch.Tensor]) -> None:
        """Overwrite the rows the shards changed since ``pending``'s pull (in place)."""
        refreshed = self._refreshes(pending)
        start = time.perf_counter()
        for i, (where, changed, _) in enumerate(refreshed):
            where = torch.from_numpy(np.asarray(where))
            if where.numel():
                where = pending.positions[i][where] if pending.positions else where
                for name, out in rows.items():
                    out.index_copy_(0, where, _read_only(changed[name]))
        self.times.refreshes += 1
        self.times.refreshed_rows += sum(len(a[0]) for a in refreshed)
        self.times.pull += time.perf_counter() - start

    def prefetch(self, ids: torch.Tensor, step: int) -> None:
        """Start pulling ``ids`` for ``step`` now; the :meth:`pull` of the same ids collects it
        (prefetches are collected in the order they were issued). The shards answer at once
        with the rows as of this client's last push; the push of step ``step - 1 -
        staleness`` (or the pull, if that push came first) refreshes the rows it changed."""
        need = min(step - 1 - self.staleness, self.last_push_step)
        self._prefetches.append(self._issue_pull(ids, step, need))

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
        step = self.last_push_step + 1
        return self._collect(self._issue_pull(flat, step, step - 1 - self.staleness))

    # --- pushes -----------------------------------------------------------------------------
    def push(
        self,
        ids: torch.Tensor | dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        """Send row gradients of ``step``: one call per shard (every shard, even with no rows,
        so that it can count the step), without waiting for them to be applied. The calls
        also carry the refresh of a prefetch that must reflect ``step`` (see :meth:`prefetch`).

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
        due = next(
            (q for q in self._prefetches if q.refresh is None and q.need < q.target <= step), None
        )
        record = _Push(step)
        payload = self.backend.put(list(zip(per_ids, per_grads)))  # serialised once
        issued = time.time()
        for p in range(self.num_shards):
            args = (self.token, self.worker, step, payload, p)
            if due is not None and p in due.asked:
                args += ([(due.request, due.target)],)
            record.futures.append(self.backend.call(p, "push_part", *args))
        if due is not None:
            due.refresh = [record.futures[p] for p in due.asked]
            due.refresh_issued = issued
        self._pushes.append(record)
        self.last_push_step = max(self.last_push_step, step)
        self.times.push += time.perf_counter() - start

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

    def close(self) -> None:
        """Drop the prefetches and wait for every push to be accepted (nothing is lost)."""
        self.cancel_prefetch()
        self.flush()

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
