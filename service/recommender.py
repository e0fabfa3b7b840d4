"""The serving facade: the current `Model`, the user history store, and atomic model swaps.

`Recommender` is what the HTTP routes call (from worker threads: every method blocks on CPU or
disk). It adds the stored histories to queries, appends watch events, and swaps models:

* A model swap is one reference assignment. A call reads the reference once and finishes on
  that model, so requests in flight when a reload lands complete on the old model and never
  mix two models.
* `reload` loads and verifies the new artifacts and builds or loads their index *before* the
  swap; any error leaves the old model serving. One reload runs at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from service.model import Model
from service.queries import Recommendation, ScoredItem, SearchObserver, UserQuery
from service.store import HistoryStore

logger = logging.getLogger(__name__)

ModelLoader = Callable[[Path], Model]


class ReloadInProgressError(RuntimeError):
    """A reload was asked for while another one is running."""


@dataclasses.dataclass(frozen=True)
class AppendResult:
    """Outcome of `Recommender.append_events`."""

    user_id: str
    appended: int
    history_length: int
    unknown_items: list[str]
    model_version: str


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    """Outcome of a successful `Recommender.reload`."""

    previous_version: str
    model: Model
    seconds: float
    seeded_events: int


def seed_store(store: HistoryStore, model: Model, reseed_on_new_model: bool = True) -> int:
    """Seed ``store`` with ``model``'s training histories; returns the events written.

    With ``reseed_on_new_model`` the store is (re)seeded whenever its recorded model version
    differs from ``model``'s (replacing the stored histories, see `HistoryStore.seed`);
    otherwise only an empty store is seeded. Idempotent for one model version.
    """
    version = model.model_version if reseed_on_new_model else None
    if store.num_users() and (version is None or store.model_version() == version):
        logger.info(
            "history store already seeded (model version %s); seed skipped", store.model_version()
        )
        return 0  # seeded already: spare reading the training histories
    return store.seed_rows(model.artifacts.histories(), version)


class Recommender:
    """Answers queries with the current model and the stored user histories.

    Args:
        model: the model to serve first.
        store: the user watch histories (seeded by the caller, see `seed_store`).
        history_limit: most recent stored items read per user.
        on_search: called with (index kind, seconds) after each index search (metrics).
    """

    def __init__(
        self,
        model: Model,
        store: HistoryStore,
        *,
        history_limit: int = 1000,
        on_search: SearchObserver | None = None,
    ) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {history_limit}.")
        self._model = model
        self.store = store
        self.history_limit = history_limit
        self._on_search = on_search
        self._reload_lock = threading.Lock()

    @property
    def model(self) -> Model:
        """The model serving now (read it once per request)."""
        return self._model

    def recommend(self, queries: Sequence[UserQuery]) -> list[Recommendation]:
        """Answer ``queries`` in one batch on one model.

        A query with a ``user_id`` uses the user's stored history, followed by the query's
        explicit ``history``.
        """
        model = self._model
        return model.recommend(self._with_stored_histories(queries), on_search=self._on_search)

    def similar(self, item_id: str, k: int) -> tuple[str, list[ScoredItem]]:
        """(model version, the ``k`` items nearest to ``item_id``); see `Model.similar`."""
        model = self._model
        return model.model_version, model.similar(item_id, k, on_search=self._on_search)

    def append_events(
        self,
        user_id: str,
        item_ids: Sequence[str],
        timestamps: Sequence[float] | None = None,
    ) -> AppendResult:
        """Append watches to ``user_id``'s history (durable on return).

        Every id is stored (a later model may know it); the ids the current model does not know
        are reported.
        """
        model = self._model
        length = self.store.append(user_id, list(item_ids), timestamps)
        return AppendResult(
            user_id=user_id,
            appended=len(item_ids),
            history_length=length,
            unknown_items=model.unknown(item_ids),
            model_version=model.model_version,
        )

    def history(self, user_id: str, limit: int) -> tuple[list[str], int]:
        """(the last ``limit`` stored items of ``user_id``, most recent last; total stored)."""
        return self.store.history(user_id, limit), self.store.length(user_id)

    def swap(self, model: Model) -> Model:
        """Serve ``model`` from now on; returns the previous one."""
        previous, self._model = self._model, model
        logger.info("now serving model %s (was %s)", model.model_version, previous.model_version)
        return previous

    def reload(
        self,
        path: Path,
        loader: ModelLoader,
        reseed_on_new_model: bool = True,
        *,
        seed: bool = True,
    ) -> ReloadResult:
        """Load the artifacts at ``path`` with ``loader``, seed the store (unless ``seed`` is
        False: another process of the fleet did), then swap.

        Raises:
            ReloadInProgressError: another reload is running.
            ArtifactError, ValueError, OSError: from ``loader``; the old model keeps serving.
        """
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadInProgressError(
                "a reload is already in progress; retry once it has finished"
            )
        try:
            start = time.perf_counter()
            model = loader(Path(path))
            seeded = seed_store(self.store, model, reseed_on_new_model) if seed else 0
            previous = self.swap(model)
            return ReloadResult(
                previous_version=previous.model_version,
                model=model,
                seconds=time.perf_counter() - start,
                seeded_events=seeded,
            )
        finally:
            self._reload_lock.release()

    def _with_stored_histories(self, queries: Sequence[UserQuery]) -> list[UserQuery]:
        """``queries`` with their users' stored histories in front (one store read)."""
        users = [q.user_id for q in queries if q.user_id is not None]
        if not users:
            return list(queries)
        stored = iter(self.store.histories(users, self.history_limit))
        out = []
        for query in queries:
            if query.user_id is not None:
                history = next(stored)
                if history:
                    query = dataclasses.replace(query, history=[*history, *query.history])
            out.append(query)
        return out
