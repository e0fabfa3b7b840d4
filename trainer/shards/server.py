"""One shard's state machine, independent of the transport (Ray actor or in-process).

:class:`ShardServer` owns an :class:`~trainer.embeddings.EmbeddingShard`, fences requests from
a previous incarnation of the run (``token``), tracks which steps are applied, sums the
contributions of several workers in ``sync`` mode, applies updates lazily row by row
(:meth:`ShardServer.settle`), keeps a version per row so that an early pull can later be
brought up to date with only the rows changed since (:meth:`ShardServer.refresh`), and writes /
restores two-slot checkpoints (:mod:`trainer.shards.slots`). No Ray import here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.embeddings import EmbeddingShard
from trainer.shards.slots import load_slotted, save_slotted
from trainer.storage import StoragePath

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
MAX_REQUESTS = 256  # remembered early pulls per shard (older ones can no longer be refreshed)


class ShardFailure(RuntimeError):
    """A shard is gone or was restarted: the run must roll back to a common checkpoint."""


class ShardRestartedError(ShardFailure):
    """A request reached a shard that was restarted (or restored) since the caller's token."""


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def _sum_contributions(
    parts: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sum several workers' ``(ids, grads)`` per table into unique rows (deterministic order)."""
    ids_out: dict[str, torch.Tensor] = {}
    grads_out: dict[str, torch.Tensor] = {}
    for name in sorted({n for _, g in parts for n in g}):
        ids = torch.cat([torch.from_numpy(np.asarray(i[name])) for i, g in parts if name in g])
        grads = torch.cat([torch.from_numpy(np.asarray(g[name])) for _, g in parts if name in g])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        total = grads.new_zeros((uniq.numel(), *grads.shape[1:]))
        total.index_add_(0, inverse, grads)
        ids_out[name], grads_out[name] = uniq, total
    return ids_out, grads_out


class ShardServer:
    """One shard's state machine, independent of the transport (Ray actor or in-process).

    Args:
        make_shard: builds the shard's initial state (deterministic init; used for step 0).
        num_workers: trainer workers that push to this shard.
        mode: "sync" (the ``num_workers`` contributions of a step are summed and applied once,
            in step order) or "async" (each push is applied when it arrives).
        run_dir: the run's ``out_dir``; checkpoints go to ``<run_dir>/shards/``.

    A new server loads its latest checkpoint if the run directory has one (a restarted actor
    comes back with its last saved rows) and is *fenced*: it refuses pulls and pushes until
    :meth:`restore` gives it the run's current token, so a restarted shard can never serve or
    absorb a request of the timeline it lost.
    """

    def __init__(
        self,
        make_shard: Callable[[], EmbeddingShard],
        num_workers: int = 1,
        mode: str = "sync",
        run_dir: str | Path | None = None,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}.")
        self._make_shard = make_shard
        self.shard = make_shard()
        self.shard_id = self.shard.shard_id
        self.num_workers = num_workers
        self.mode = mode
        self.run_dir = StoragePath.of(run_dir) if run_dir is not None else None
        self.token = -1
        self.done = dict.fromkeys(range(num_workers), 0)
        self.pending: dict[int, dict[int, tuple[dict, dict]]] = {}  # sync: step -> worker parts
        self.deferred: list[tuple[int, dict, dict]] = []  # (step, ids, grads) not yet applied
        self.restored_step = 0
        self.restored_from: str | None = None
        self.loaded = ("ckpt", 0)  # the saved state the rows equal while not dirty
        self.dirty = False
        self.seq = 0  # recorded updates so far (never goes back, even on restore)
        self.version = torch.zeros(self.shard.size, dtype=torch.long)  # row -> seq of its update
        self.requests: OrderedDict[tuple[int, int], tuple[torch.Tensor, int]] = OrderedDict()
        self._load_latest()

    # paths
    def path(self, tag: str = "ckpt") -> StoragePath:
        if self.run_dir is None:
            raise ValueError("this shard has no run_dir; pass run_dir to save or restore.")
        base = self.run_dir / SHARD_DIR
        name = f"shard-{self.shard_id}.pt"
        return base / name if tag == "ckpt" else base / tag / name

    def _load_latest(self) -> int:
        """Load this shard's last checkpoint, if the run directory has one; its step (0: none)."""
        if self.run_dir is None or not self.path().exists():
            return 0
        state = self.path().load_torch()
        self.shard.load_state_dict(state["shard"])
        self.restored_step = int(state["step"])
        self.restored_from = str(self.path())
        self.loaded = ("ckpt", self.restored_step)
        self.done = dict.fromkeys(range(self.num_workers), self.restored_step)
        logger.warning(
            "shard %d: loaded its last checkpoint %s (step %d); waiting for the driver",
            self.shard_id,
            self.path(),
            self.restored_step,
        )
        return self.restored_step

    # requests
    @property
    def applied(self) -> int:
        """Every worker's pushes up to this step are applied."""
        return min(self.done.values())

    def check(self, token: int) -> None:
        if token != self.token:
            raise ShardRestartedError(
                f"shard {self.shard_id} is at token {self.token} (restored step "
                f"{self.restored_step}), the request has token {token}; the shard was restarted "
                f"or restored, roll the run back to a common checkpoint."
            )

    def ready(self, need: int, token: int | None = None) -> bool:
        """Whether a request that needs step ``need`` applied can be answered now (a stale
        token is 'ready' too: it is answered with :class:`ShardRestartedError`)."""
        return (token is not None and token != self.token) or self.applied >= need

    def pull(
        self, token: int, local_ids: np.ndarray, need: int, request: tuple[int, int] | None = None
    ) -> tuple[dict[str, np.ndarray], float]:
        """Rows ``local_ids`` [N] of every table (``[N, D]`` / ``[N]`` float32 arrays) and the
        wall-clock time they were read. With a ``request`` id (``(worker, n)``) the shard
        remembers the ids and its update count, so that :meth:`refresh` can later send only
        the rows changed since."""
        self.check(token)
        if not self.ready(need):
            raise RuntimeError(
                f"shard {self.shard_id}: pull needs step {need} applied, only {self.applied} "
                f"is; wait with ready() first."
            )
        local = torch.from_numpy(np.asarray(local_ids))
        self.settle(local)
        if request is not None:
            self.requests[tuple(request)] = (local, self.seq)
            while len(self.requests) > MAX_REQUESTS:
                self.requests.popitem(last=False)
        rows = {k: v.numpy() for k, v in self.shard.pull(local).items()}
        return rows, time.time()

    def refreshable(self, token: int, request: tuple[int, int], need: int) -> bool:
        """Whether :meth:`refresh` can answer now (a stale token: yes, with an error)."""
        return token != self.token or (self.applied >= need and tuple(request) in self.requests)

    def refresh(
        self, token: int, request: tuple[int, int], need: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        """Bring the rows of an earlier :meth:`pull` ``request`` up to step ``need``.

        Returns:
            ``(positions [M], rows, time)``: the positions (in the pulled ``local_ids``) of the
            rows updated since that pull, their current rows per table (``[M, D]`` / ``[M]``),
            and the wall-clock time.
        """
        self.check(token)
        if not self.refreshable(token, request, need):
            raise RuntimeError(
                f"shard {self.shard_id}: refresh of request {request} needs step {need} applied "
                f"(applied: {self.applied}) and the request's pull served first "
                f"({tuple(request) in self.requests}); wait with refreshable() first."
            )
        local, seq = self.requests.pop(tuple(request))
        positions = (self.version.index_select(0, local) > seq).nonzero().reshape(-1)
        changed = local.index_select(0, positions)
        self.settle(changed)
        rows = {k: v.numpy() for k, v in self.shard.pull(changed).items()}
        return positions.numpy(), rows, time.time()

    def push(
        self,
        token: int,
        worker: int,
        step: int,
        ids: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
    ) -> None:
        """Gradients of worker ``worker`` for ``step``: ids [n] (unique, local) and grads
        ``[n, D]`` per table. In sync mode with several workers the step is applied once all
        of them pushed it (summed), in step order."""
        self.check(token)
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}.")
        if self.mode == "async":
            self._apply(_tensors(ids), _tensors(grads), step)
            self.done[worker] = max(self.done[worker], step)
            return
        # sync: in step order even when Ray delivers a worker's pushes out of order (it does
        # not order the calls of an asyncio actor), summed over the workers
        self.pending.setdefault(step, {})[worker] = (ids, grads)
        while len(self.pending.get(self.applied + 1, ())) == self.num_workers:
            s = self.applied + 1
            contributions = self.pending.pop(s)
            if self.num_workers == 1:  # the client sent unique ids: nothing to sum
                self._apply(*(_tensors(part) for part in contributions[0]), s)
            else:
                self._apply(
                    *_sum_contributions([contributions[w] for w in sorted(contributions)]), s
                )
            self.done = dict.fromkeys(self.done, s)

    def push_part(self, token: int, worker: int, step: int, parts: list, index: int) -> None:
        """:meth:`push` of ``parts[index]``: a step's pushes to every shard travel as one
        object (serialised once), each shard reads its own ``(ids, grads)``. The transports
        answer a ``refresh`` ``(request, need)`` given with it after the push (one round trip
        for both: see :meth:`refresh`)."""
        self.push(token, worker, step, *parts[index])

    def _apply(self, ids: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], step: int):
        """Record a step's row updates (checked now, applied by :meth:`settle`)."""
        ids = self.shard.check_push(ids, grads)
        if any(g.shape[0] for g in grads.values()):
            self.deferred.append((step, ids, grads))
            self.dirty = True
            self.seq += 1
            for rows in ids.values():
                self.version.index_fill_(0, rows, self.seq)

    def settle(self, rows: torch.Tensor | None = None) -> None:
        """Apply recorded updates: all of them, or only those of local ``rows``.

        Pushes are applied lazily: a pull first applies the pending updates of the rows it
        reads (in step order) and answers; the transport then calls ``settle()`` for the rest
        (the actor does so after replying, so most of the optimizer's work overlaps the
        worker's next step). The optimizer is row-wise (Adam's bias correction uses the
        global step), so applying a step's update in row subsets changes nothing.
        """
        if rows is None:
            for step, ids, grads in self.deferred:
                self.shard.push(ids, grads, step)
            self.deferred = []
            return
        later = []
        for step, ids, grads in self.deferred:
            now_ids, now_grads, rest_ids, rest_grads = {}, {}, {}, {}
            for name, grad in grads.items():
                hit = torch.isin(ids[name], rows)
                if bool(hit.all()):
                    now_ids[name], now_grads[name] = ids[name], grad
                elif not bool(hit.any()):
                    rest_ids[name], rest_grads[name] = ids[name], grad
                else:
                    now_ids[name], now_grads[name] = ids[name][hit], grad[hit]
                    rest_ids[name], rest_grads[name] = ids[name][~hit], grad[~hit]
            if now_grads:
                self.shard.push(now_ids, now_grads, step)
            if rest_grads:
                later.append((step, rest_ids, rest_grads))
        self.deferred = later

    def tables(self, token: int) -> dict[str, np.ndarray]:
        """This shard's rows of every table (``[rows, D]`` arrays)."""
        self.check(token)
        self.settle()
        return {k: v.numpy() for k, v in self.shard.tables.items()}

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard_id,
            "token": self.token,
            "applied": self.applied,
            "restored_step": self.restored_step,
            "restored_from": self.restored_from,
            "rows": self.shard.size,
            "deferred_steps": len(self.deferred),
            "pid": os.getpid(),
            **self.shard.counters.as_dict(),
        }

    # checkpoints
    def save(self, token: int, tag: str, step: int) -> str:
        """Write this shard (tables + optimizer state) at ``step`` to its two-slot file."""
        self.check(token)
        if self.applied < step:
            raise RuntimeError(
                f"shard {self.shard_id}: checkpoint of step {step} requested, but only step "
                f"{self.applied} is applied; wait with ready() first."
            )
        self.settle()
        path = self.path(tag)
        save_slotted({"step": step, "tag": tag, "shard": self.shard.state_dict()}, path)
        self.loaded, self.dirty = (tag, step), False
        return str(path)

    def restore(self, token: int, tag: str, step: int) -> int:
        """Go to the state saved at ``step`` (step 0 of ``ckpt`` = the initial rows) and
        accept requests with ``token`` from now on. Returns ``step``."""
        if self.dirty or self.loaded != (tag, step):
            if tag == "ckpt" and step == 0:
                self.shard = self._make_shard()
            else:
                self.shard.load_state_dict(load_slotted(self.path(tag), step)["shard"])
        self.done = dict.fromkeys(self.done, step)
        self.pending = {}
        self.deferred = []
        self.version.zero_()  # rows before any pull after this point; seq stays monotonic
        self.requests.clear()
        self.restored_step = step
        self.loaded, self.dirty = (tag, step), False
        self.token = token
        return step


def shard_factory(
    shard_id: int,
    num_shards: int,
    num_rows: int,
    dims: dict[str, int],
    optim,
    partition_strategy: str,
    init_std: float,
    seed: int,
) -> Callable[[], EmbeddingShard]:
    """A picklable-argument closure that builds shard ``shard_id``'s initial state."""

    def make() -> EmbeddingShard:
        return EmbeddingShard(
            shard_id,
            num_shards,
            num_rows,
            dims,
            optim,
            partition_strategy=partition_strategy,
            init_std=init_std,
            seed=seed,
        )

    return make
