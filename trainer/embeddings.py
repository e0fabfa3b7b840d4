"""Item tables as a parameter server: one shard's rows, a row-wise optimizer, and a local store.

A training step pulls the rows it needs (the unique item ids of its histories, targets and
sampled candidates), computes gradients w.r.t. those rows only, and pushes them back; the shard
applies a row-wise optimizer to the touched rows. The in-process trainer uses one
:class:`EmbeddingShard` through :class:`LocalStore`; the Ray trainer puts one shard in each
actor and routes ids with :mod:`sampler.routing`. Both run the same arithmetic, so synchronous
sharded training reproduces local training.

No Ray import here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from sampler import routing
from trainer.config import ModelConfig, OptimConfig
from trainer.model import init_rows

logger = logging.getLogger(__name__)


def table_dims(model: ModelConfig) -> dict[str, int]:
    """Names and row sizes of the item tables (0 = a vector, e.g. the biases)."""
    dims = {"output": model.embedding_dim, "bias": 0}
    if not model.tie_weights:
        dims["input"] = model.history_dim
    return dims


class RowOptimizer:
    """SGD, Adagrad or Adam (lazy: only touched rows' state moves) applied to rows of a table.

    Adam's bias correction uses the global step passed to :meth:`apply`, as TensorFlow's
    LazyAdam does, so the update of a row does not depend on which shard holds it.
    """

    def __init__(self, cfg: OptimConfig) -> None:
        self.cfg = cfg

    def init_state(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self.cfg.embedding_optimizer
        if kind == "adam":
            return {"m": torch.zeros_like(table), "v": torch.zeros_like(table)}
        if kind == "adagrad":
            return {"acc": torch.full_like(table, self.cfg.adagrad_init)}
        return {}

    @torch.no_grad()
    def apply(
        self,
        table: torch.Tensor,
        state: dict[str, torch.Tensor],
        rows: torch.Tensor,
        grad: torch.Tensor,
        step: int,
    ) -> None:
        """Update ``table[rows]`` in place with ``grad`` (``rows`` must be unique).

        Vectorised: one gather, elementwise math and one scatter (``index_copy_``) per state
        tensor, whatever the number of rows (on CPU, faster than ``index_add_`` and, rows being
        unique, bitwise the same).
        """
        lr = self.cfg.embedding_lr
        kind = self.cfg.embedding_optimizer
        grad = grad.to(table.dtype)
        if kind == "sgd":
            _add_rows(table, rows, grad, -lr)
        elif kind == "adagrad":
            acc = state["acc"].index_select(0, rows).addcmul_(grad, grad)
            state["acc"].index_copy_(0, rows, acc)
            _add_rows(table, rows, grad / acc.sqrt_().add_(1e-10), -lr)
        else:
            b1, b2 = self.cfg.betas
            m = state["m"].index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
            v = state["v"].index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
            state["m"].index_copy_(0, rows, m)
            state["v"].index_copy_(0, rows, v)
            step_size = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
            _add_rows(table, rows, m.div_(v.sqrt_().add_(self.cfg.eps)), -step_size)


def _add_rows(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``table[rows] += alpha * x`` for unique ``rows`` [n] (``x``: ``[n, ...]``)."""
    table.index_copy_(0, rows, table.index_select(0, rows).add_(x, alpha=alpha))


@dataclass
class ShardCounters:
    pulls: int = 0
    pushes: int = 0
    rows_pulled: int = 0
    rows_pushed: int = 0
    last_step: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class EmbeddingShard:
    """One shard's rows of every item table, with its optimizer state.

    Args:
        shard_id, num_shards: which shard of how many.
        num_rows: total rows of each table (the number of items).
        dims: table name -> row size (see :func:`table_dims`).
        optim: the row-wise optimizer settings.
        partition_strategy: "mod" or "div" (TensorFlow's layouts).
        init_std, seed: deterministic N(0, init_std^2) init of the embedding tables.

    ``pull`` and ``push`` take LOCAL row ids of this shard (``sampler.routing.route`` gives them).
    """

    shard_id: int
    num_shards: int
    num_rows: int
    dims: dict[str, int]
    optim: OptimConfig
    partition_strategy: str = "mod"
    init_std: float = 0.05
    seed: int = 0
    tables: dict[str, torch.Tensor] = field(init=False)
    state: dict[str, dict[str, torch.Tensor]] = field(init=False)
    counters: ShardCounters = field(default_factory=ShardCounters)

    def __post_init__(self) -> None:
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, {self.num_shards}), got {self.shard_id}.")
        self.size = routing.shard_sizes(self.num_rows, self.num_shards)[self.shard_id]
        self.global_ids = routing.global_ids(
            self.shard_id,
            torch.arange(self.size),
            self.num_rows,
            self.num_shards,
            self.partition_strategy,
        )
        self.tables = {}
        for name, dim in self.dims.items():
            if dim == 0:
                self.tables[name] = torch.zeros(self.size)
            else:
                self.tables[name] = init_rows(self.global_ids, dim, self.init_std, self.seed, name)
        self._optimizer = RowOptimizer(self.optim)
        self.state = {n: self._optimizer.init_state(t) for n, t in self.tables.items()}

    def _check(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.size):
            raise ValueError(
                f"shard {self.shard_id} holds local rows [0, {self.size}), got ids in "
                f"[{int(ids.min())}, {int(ids.max())}]; route global ids with sampler.routing."
            )
        return ids

    def pull(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``ids`` [N] of every table: name -> ``[N, dim]`` (or ``[N]``)."""
        ids = self._check(ids)
        self.counters.pulls += 1
        self.counters.rows_pulled += ids.numel()
        return {name: t.index_select(0, ids) for name, t in self.tables.items()}

    def check_push(
        self, ids: torch.Tensor | dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The local rows of a push, per table, after checking them (see :meth:`push`).

        Returns:
            table -> int64 rows ``[n]``, one per gradient row.

        Raises:
            ValueError: for a table this shard does not hold, or rows outside ``[0, size)``
                or not one per gradient row.
        """
        unknown = set(grads) - set(self.tables)
        if unknown:
            raise ValueError(
                f"unknown tables {sorted(unknown)}; shard {self.shard_id} has "
                f"{sorted(self.tables)}."
            )
        rows = {}
        for name, grad in grads.items():
            r = torch.as_tensor(ids[name] if isinstance(ids, dict) else ids, dtype=torch.long)
            if grad.shape[0] != r.numel() or (
                r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.size)
            ):
                raise ValueError(
                    f"shard {self.shard_id}: push of {name!r} needs unique local rows in "
                    f"[0, {self.size}) and one gradient row each, got {r.numel()} rows and "
                    f"{grad.shape[0]} gradient rows; route global ids with sampler.routing."
                )
            rows[name] = r
        return rows

    def push(
        self,
        ids: torch.Tensor | dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        """Apply gradients for the tables named in ``grads``.

        Args:
            ids: unique local rows, one tensor for all tables or a dict table -> rows.
            grads: table -> ``[len(rows), dim]`` (or ``[len(rows)]``) gradients.
            step: the global step (1-based), for Adam's bias correction.
        """
        rows = self.check_push(ids, grads)
        for name, grad in grads.items():
            self._optimizer.apply(self.tables[name], self.state[name], rows[name], grad, step)
        self.counters.pushes += 1
        self.counters.rows_pushed += max((r.numel() for r in rows.values()), default=0)
        self.counters.last_step = max(self.counters.last_step, step)

    def state_dict(self) -> dict:
        """Tables, optimizer state and counters (tensors and plain values only)."""
        return {
            "meta": {
                "shard_id": self.shard_id,
                "num_shards": self.num_shards,
                "num_rows": self.num_rows,
                "partition_strategy": self.partition_strategy,
                "dims": dict(self.dims),
            },
            "tables": {n: t.clone() for n, t in self.tables.items()},
            "state": {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()},
            "counters": self.counters.as_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        meta = sd["meta"]
        mine = self.state_dict()["meta"]
        if meta != mine:
            raise ValueError(f"checkpoint is for shard {meta}, this shard is {mine}.")
        self.tables = {n: t.clone() for n, t in sd["tables"].items()}
        self.state = {n: {k: v.clone() for k, v in s.items()} for n, s in sd["state"].items()}
        self.counters = ShardCounters(**sd["counters"])

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` atomically (temporary file, fsync, rename)."""
        atomic_torch_save(self.state_dict(), Path(path))

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=True))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file in ``path``'s folder, fsync, then rename over ``path``:
    readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


class LocalStore:
    """The whole item table in this process: one :class:`EmbeddingShard`, global ids = local ids.

    Has the same ``pull``/``push``/``state_dict``/``full_tables`` interface as the Ray client.
    """

    def __init__(self, num_rows: int, model: ModelConfig, optim: OptimConfig, seed: int) -> None:
        self.shard = EmbeddingShard(
            0, 1, num_rows, table_dims(model), optim, init_std=model.init_std, seed=seed
        )

    def pull(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.shard.pull(ids)

    def push(self, ids, grads: dict[str, torch.Tensor], step: int) -> None:
        self.shard.push(ids, grads, step)

    def full_tables(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shard.tables.items()}

    def state_dict(self) -> dict:
        return {"shards": [self.shard.state_dict()]}

    def load_state_dict(self, sd: dict) -> None:
        self.shard.load_state_dict(sd["shards"][0])
