"""What the routes share: the settings, metrics, the recommender once loaded, worker threads.

`ServiceState.start` (called by the app's lifespan) starts the compute threads and loads the
model in the background, so the server answers ``/healthz`` at once and ``/readyz`` says 503
until the model is ready (or why it failed). All CPU and disk work runs on threads: model
queries on the micro-batcher's compute threads, the rest on the default thread pool.

Once loaded, a watcher task polls the store's model pointer (`service.fleet`) and moves this
process to a model that a reload through another worker or replica published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from starlette.concurrency import run_in_threadpool

from service.batching import MicroBatcher
from service.fleet import Fleet
from service.index import set_num_threads
from service.loading import load_model
from service.metrics import ServiceMetrics
from service.model import Model
from service.queries import Recommendation, UserQuery
from service.recommender import Recommender, ReloadInProgressError, ReloadResult, seed_store
from service.settings import ServiceSettings
from service.store import HistoryStore, ModelPointer, open_store
from trainer.artifacts import ArtifactError

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]
ModelFactory = Callable[[ServiceSettings, Path, Path], Model]
RELOAD_LOCK = "reload"
RELOAD_LOCK_TTL_S = 900.0


def default_model_factory(settings: ServiceSettings, path: Path, index_dir: Path) -> Model:
    """`load_model` with the index settings of ``settings``, the index kept in ``index_dir``."""
    return load_model(path, settings.index.model_copy(update={"dir": index_dir}))


class ServiceState:
    """The service's shared objects and their lifecycle.

    Args:
        settings: validated settings.
        metrics: where requests, searches and the model version are recorded.
        model_factory: ``(settings, artifacts path, index dir) -> Model``; tests may stub it.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        model_factory: ModelFactory = default_model_factory,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.recommender: Recommender | None = None
        self.status: Status = "loading"
        self.error: str | None = None
        self._model_factory = model_factory
        self.follow_error: str | None = None  # why the last move to a published model failed
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store: HistoryStore | None = None
        self._fleet: Fleet | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher[UserQuery, Recommendation] | None = None
        self._load_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the compute threads and the background model load."""
        s = self.settings
        set_num_threads(s.index.num_threads)
        if s.torch_threads is not None:
            import torch

            torch.set_num_threads(s.torch_threads)
        self._executor = ThreadPoolExecutor(
            s.compute_threads, thread_name_prefix="shardrec-compute"
        )
        self._batcher = MicroBatcher(
            self._recommend_batch,
            max_batch=s.micro_batch,
            executor=self._executor,
            concurrency=s.compute_threads,
        )
        self._batcher.start()
        self._load_task = asyncio.create_task(self._load(), name="shardrec-load")

    async def wait_loaded(self) -> None:
        """Until the initial load has finished (ready or failed)."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def stop(self) -> None:
        """Stop the threads and close the store (after the initial load has finished)."""
        if self._load_task is not None and not self._load_task.done():
            logger.info("shutdown: waiting for the model load to finish")
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
        logger.info("service stopped")

    async def _load(self) -> None:
        start = time.perf_counter()
        try:
            self.recommender = await run_in_threadpool(self._load_sync)
        except Exception as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.exception("could not load the model from %s", self.settings.artifacts)
            if self._store is not None:
                self._store.close()
                self._store = None
            return
        self.status = "ready"
        logger.info(
            "ready: model %s in %.1fs",
            self.recommender.model.model_version,
            time.perf_counter() - start,
        )
        self._watch_task = asyncio.create_task(self._watch(), name="shardrec-watch")

    def _index_dir(self, path: Path) -> Path:
        s = self.settings
        if path.resolve() == s.artifacts.resolve():
            return s.index.directory(s.artifacts)  # the configured one (--index-dir)
        return path / f"index-{s.index.kind}"

    def _load_sync(self) -> Recommender:
        s = self.settings
        self._store = open_store(s)
        self._fleet = Fleet(self._store, s.artifacts)
        path = self._fleet.startup_path()
        model = self._model_factory(s, path, self._index_dir(path))
        seed_store(self._store, model, s.reseed_on_new_model)
        self._fleet.started(model.model_version, path)
        self._record_model(model)
        return Recommender(
            model,
            self._store,
            history_limit=s.max_history,
            on_search=self.metrics.observe_search,
        )

    def _record_model(self, model: Model) -> None:
        recall = model.index_info.recall
        self.metrics.set_model(
            model.model_version,
            model.index.kind,
            num_items=model.num_items,
            recall=recall.recall if recall is not None else None,
        )

    # ------------------------------------------------------------------ work

    def _recommend_batch(self, queries: list[UserQuery]) -> list[Recommendation]:
        assert self.recommender is not None
        self.metrics.batch_size.observe(len(queries))
        return self.recommender.recommend(queries)

    async def recommend(self, queries: Sequence[UserQuery]) -> list[Recommendation]:
        """Answers on the compute threads, batched with concurrent requests."""
        assert self._batcher is not None
        return await self._batcher.submit(queries)

    def _load_path(self, path: Path) -> Model:
        return self._model_factory(self.settings, path, self._index_dir(path))

    async def reload(self, path: Path) -> ReloadResult:
        """Load ``path`` (verified, index built or loaded) on a thread, swap it in, then publish
        it to the fleet (one reload at a time across processes: a store lock)."""
        return await run_in_threadpool(self._reload_sync, path)

    def _reload_sync(self, path: Path) -> ReloadResult:
        recommender, store, fleet = self.recommender, self._store, self._fleet
        assert recommender is not None and store is not None and fleet is not None
        if not store.acquire_lock(RELOAD_LOCK, self.process_id, RELOAD_LOCK_TTL_S):
            raise ReloadInProgressError(
                "a reload is already in progress in another process of this deployment; retry "
                "once it has finished"
            )
        try:
            result = recommender.reload(path, self._load_path, self.settings.reseed_on_new_model)
            self._record_model(result.model)
            fleet.publish(result.model.model_version, path)
            self.follow_error = None
            return result
        finally:
            store.release_lock(RELOAD_LOCK, self.process_id)

    # ------------------------------------------------------------------ the fleet's pointer

    async def _watch(self) -> None:
        """Poll the model pointer; move to a newer published model (see `service.fleet`)."""
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                await run_in_threadpool(self.follow_once)
            except Exception:
                logger.exception("could not check the model pointer; retrying")

    def follow_once(self) -> ModelPointer | None:
        """Move to the published model if it is newer than this process's; the pointer moved
        to, or None."""
        recommender, fleet = self.recommender, self._fleet
        assert recommender is not None and fleet is not None
        pointer = fleet.to_follow(recommender.model.model_version)
        if pointer is None:
            return None
        start = time.perf_counter()
        try:
            result = recommender.reload(Path(pointer.path), self._load_path, seed=False)
        except ReloadInProgressError:
            return None  # a reload of this process runs: look again at the next poll
        except (ArtifactError, ValueError, OSError) as e:
            fleet.follow_failed(pointer, f"{type(e).__name__}: {e}")
            self.follow_error = f"model {pointer.version} (pointer {pointer.serial}): {e}"
            return None
        fleet.followed(pointer)
        self._record_model(result.model)
        self.follow_error = None
        logger.info(
            "moved to model %s (pointer %d) in %.2fs",
            pointer.version,
            pointer.serial,
            time.perf_counter() - start,
        )
        return pointer
