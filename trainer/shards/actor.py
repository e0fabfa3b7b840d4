"""The Ray transport: one embedding shard as a Ray actor (a thin async wrapper around
:class:`~trainer.shards.server.ShardServer`), and :class:`RayShards`, the client's handle on
such actors. The only module of :mod:`trainer.shards` that imports Ray.

The actor is an asyncio actor so that a pull (or a checkpoint) that needs a step that is not
applied yet can wait for it without blocking the pushes that will apply it; every method is a
few lines: wait for the condition, call the server, wake the waiters.

Actors are created with ``max_restarts`` and ``max_task_retries=-1``: a killed shard comes
back (its constructor reloads ``<out_dir>/shards/shard-<i>.pt``) and calls that were in flight
are retried on the new incarnation, which answers them with
:class:`~trainer.shards.server.ShardRestartedError` until the driver has rolled the whole run
back to a common checkpoint (:mod:`trainer.distributed.driver`).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from trainer.config import ModelConfig, OptimConfig
from trainer.embeddings import table_dims
from trainer.shards.server import ShardFailure, ShardServer, shard_factory

logger = logging.getLogger(__name__)


def setup_actor_process(log_level: int) -> None:
    """One torch thread (processes share few cores), logging to stderr, no numpy warning
    about the read-only arrays Ray hands over (they are only read)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    root = logging.getLogger("trainer")
    root.setLevel(log_level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


@ray.remote
class ShardActor:
    """Shard ``shard_id`` of ``num_shards`` of every item table (see :class:`ShardServer`)."""

    def __init__(
        self,
        shard_id: int,
        num_shards: int,
        num_rows: int,
        model_json: str,
        optim_json: str,
        partition_strategy: str,
        seed: int,
        num_workers: int,
        mode: str,
        run_dir: str,
        log_level: int = logging.INFO,
    ) -> None:
        setup_actor_process(log_level)
        model = ModelConfig.model_validate_json(model_json)
        make = shard_factory(
            shard_id,
            num_shards,
            num_rows,
            table_dims(model),
            OptimConfig.model_validate_json(optim_json),
            partition_strategy,
            model.init_std,
            seed,
        )
        self.server = ShardServer(make, num_workers, mode, run_dir)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created on the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def _wait(self, need: int, token: int) -> None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.server.ready(need, token))

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def pull(self, token: int, local_ids: np.ndarray, need: int, request=None):
        await self._wait(need, token)
        rows = self.server.pull(token, local_ids, need, request)
        if request is not None:
            await self._notify()  # a refresh of this request may be waiting for it
        asyncio.get_running_loop().call_soon(self.server.settle)  # the rest, after replying
        return rows

    async def refresh(self, token: int, request: tuple, need: int):
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.server.refreshable(token, request, need))
        out = self.server.refresh(token, request, need)
        asyncio.get_running_loop().call_soon(self.server.settle)
        return out

    async def push_part(
        self, token: int, worker: int, step: int, parts: list, index: int, refresh=()
    ):
        """The push, then the refreshes ``[(request, need), ...]`` asked with it (their
        answers, in order: one round trip for the push and the next step's changed rows)."""
        self.server.push_part(token, worker, step, parts, index)
        await self._notify()
        return [await self.refresh(token, request, need) for request, need in refresh]

    async def tables(self, token: int) -> dict:
        return self.server.tables(token)

    async def save(self, token: int, tag: str, step: int) -> str:
        await self._wait(step, token)
        return self.server.save(token, tag, step)

    async def restore(self, token: int, tag: str, step: int) -> int:
        step = self.server.restore(token, tag, step)
        await self._notify()  # waiters of the old token fail fast
        return step

    async def info(self) -> dict:
        return {**self.server.info(), "node": ray.get_runtime_context().get_node_id()}


def create_shard_actors(
    num_shards: int,
    num_rows: int,
    model: ModelConfig,
    optim: OptimConfig,
    partition_strategy: str,
    seed: int,
    num_workers: int,
    mode: str,
    run_dir: str | Path,
    num_cpus: float,
    max_restarts: int,
    name_prefix: str | None = None,
    placement: Callable[[int], dict] | None = None,
) -> list:
    """Start ``num_shards`` :class:`ShardActor` actors (restartable; named ``<prefix>-shard-<i>``
    when a prefix is given, so tests and operators can find them; ``placement(i)``: more actor
    options for shard ``i``, e.g. its placement group bundle)."""
    actors = []
    for i in range(num_shards):
        options = {
            "num_cpus": num_cpus,
            "max_restarts": max_restarts,
            "max_task_retries": -1,
            **(placement(i) if placement else {}),
        }
        if name_prefix:
            options["name"] = f"{name_prefix}-shard-{i}"
        actors.append(
            ShardActor.options(**options).remote(
                i,
                num_shards,
                num_rows,
                model.model_dump_json(),
                optim.model_dump_json(),
                partition_strategy,
                seed,
                num_workers,
                mode,
                str(run_dir),
                logging.getLogger("trainer").getEffectiveLevel(),
            )
        )
    return actors


class RayShards:
    """Shard actors (:class:`ShardActor`); calls return Ray futures."""

    def __init__(self, actors: list) -> None:
        self.actors = list(actors)

    @property
    def num_shards(self) -> int:
        return len(self.actors)

    def call(self, shard: int, method: str, *args):
        return getattr(self.actors[shard], method).remote(*args)

    def put(self, obj):
        return ray.put(obj)

    def get(self, futures: list, timeout: float | None = None) -> list:
        try:
            return ray.get(list(futures), timeout=timeout)
        except ShardFailure:
            raise
        except (RayActorError, ActorUnavailableError) as e:
            raise ShardFailure(f"a shard actor died or is unreachable: {e}") from None
