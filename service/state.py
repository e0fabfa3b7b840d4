"""What the routes share: the settings, metrics, the recommender once loaded, worker threads.

`ServiceState.start` (called by the app's lifespan) starts the compute threads and loads the
model in the background, so the server answers ``/healthz`` at once and ``/readyz`` says 503
until the model is ready (or why it failed). All CPU and disk work runs on threads: model
queries on the micro-batcher's compute threads, the rest on the default thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from starlette.concurrency import run_in_threadpool

from service.batching import MicroBatcher
from service.index import set_num_threads
from service.loading import load_model
from service.metrics import ServiceMetrics
from service.model import Model
from service.queries import Recommendation, UserQuery
from service.recommender import Recommender, ReloadResult, seed_store
from service.settings import ServiceSettings
from service.store import HistoryStore

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]
ModelFactory = Callable[[ServiceSettings, Path, Path], Model]


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
        self._store: HistoryStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher[UserQuery, Recommendation] | None = None
        self._load_task: asyncio.Task | None = None

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

    def _load_sync(self) -> Recommender:
        s = self.settings
        assert s.db_path is not None
        self._store = HistoryStore(s.db_path, synchronous=s.db_synchronous)
        model = self._model_factory(s, s.artifacts, s.index.directory(s.artifacts))
        seed_store(self._store, model, s.reseed_on_new_model)
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

    async def reload(self, path: Path) -> ReloadResult:
        """Load ``path`` (verified, index built or loaded) on a thread, then swap it in."""
        recommender = self.recommender
        assert recommender is not None
        index_dir = path / f"index-{self.settings.index.kind}"

        def load(p: Path) -> Model:
            return self._model_factory(self.settings, p, index_dir)

        result = await run_in_threadpool(
            recommender.reload, path, load, self.settings.reseed_on_new_model
        )
        self._record_model(result.model)
        return result
