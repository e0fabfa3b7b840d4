"""A served model: verified trainer artifacts, their retrieval index and the user encoder.

`Model` is plain Python (no web framework, no database): it turns `UserQuery` objects, with ids
as in the original data, into `Recommendation` objects (`service.queries`), and answers
item-to-item similarity. Histories are handed in by the caller (`service.recommender.Recommender`
reads them from the history store); `service.loading.load_model` builds one from an artifact
directory.

Scores. A recommended item ``i`` scores ``u · w_i + b_i`` (the user vector from the tower, the
item's output embedding and bias), searched through the index over augmented vectors
``[w_i, b_i]`` (see `service.index`). Similar items rank by ``w_i · w_j`` (augmented query
``[w_i, 0]``). The popularity fallback scores an item by its training popularity (a count).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from service.index import ItemIndex, RecallReport
from service.queries import (
    Recommendation,
    ScoredItem,
    SearchObserver,
    Source,
    UnknownItemError,
    UserQuery,
)
from trainer.artifacts import Artifacts


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """How the serving index came to be (``recall``: measured when it was built, saved with
    it; None when not measured)."""

    kind: str
    params: dict[str, Any]
    source: Literal["loaded", "built"]
    path: str | None
    recall: RecallReport | None
    seconds: float


@dataclasses.dataclass
class _Prepared:
    history: list[int]  # internal ids fed to the tower, most recent last
    excluded: np.ndarray  # int64 internal ids never returned
    codes: dict[str, int]
    unknown_items: list[str]
    ignored_features: list[str]


class Model:
    """Artifacts + index + user encoder, answering recommendation and similarity queries.

    Safe to call from several threads at once (it is read-only once built); a new model is
    served by building another `Model` and swapping the reference.

    Args:
        artifacts: loaded (verified) trainer artifacts.
        index: an index over exactly ``[artifacts.output_embeddings, artifacts.output_biases]``.
        index_info: how the index was obtained (reported by `summary`).
    """

    def __init__(
        self, artifacts: Artifacts, index: ItemIndex, index_info: IndexInfo | None = None
    ) -> None:
        num_items, dim = np.shape(artifacts.output_embeddings)
        if index.ntotal != num_items or index.dim != dim:
            raise ValueError(
                f"index holds {index.ntotal} items of dim {index.dim}, expected {num_items} of "
                f"dim {dim} from {artifacts.path}; build the index from these artifacts."
            )
        self.artifacts = artifacts
        self.index = index
        self.index_info = index_info or IndexInfo(
            index.kind, index.params.model_dump(), "built", None, None, 0.0
        )
        self.loaded_at = time.time()
        self._item_row = artifacts.item_index()
        self._user_row = {str(u): r for r, u in enumerate(artifacts.user_ids)}
        vocab = artifacts.feature_vocab.get("user_features", {})
        self._vocab = {
            name: {str(v): c for c, v in enumerate(values)} for name, values in vocab.items()
        }
        self._titles = [t or None for t in artifacts.titles]
        self._popular = np.argsort(-np.asarray(artifacts.popularity), kind="stable")
        self._output = np.ascontiguousarray(artifacts.output_embeddings, dtype=np.float32)

    # ------------------------------------------------------------------ properties

    @property
    def model_version(self) -> str:
        return self.artifacts.model_version

    @property
    def num_items(self) -> int:
        return int(self._output.shape[0])

    @property
    def dim(self) -> int:
        """``D``: user vector and output embedding size."""
        return int(self._output.shape[1])

    @property
    def max_history(self) -> int:
        """Most recent history items the user tower reads."""
        return int(self.artifacts.encoder.max_history)

    @property
    def feature_names(self) -> list[str]:
        return sorted(self._vocab)

    def unknown(self, item_ids: Iterable[str]) -> list[str]:
        """The ids of ``item_ids`` not in the catalogue, first occurrences in order."""
        return list(dict.fromkeys(i for i in item_ids if i not in self._item_row))

    # ------------------------------------------------------------------ queries

    def encode(self, histories: Sequence[Sequence[int]], codes: Mapping[str, Any]) -> np.ndarray:
        """User vectors float32 ``[B, D]`` for internal-id histories and feature codes ``[B]``."""
        users = self.artifacts.encoder.encode(
            [list(h) for h in histories],
            {name: np.asarray(c, dtype=np.int64) for name, c in codes.items()},
        )
        return np.ascontiguousarray(users.numpy(), dtype=np.float32)

    def recommend(
        self, queries: Sequence[UserQuery], on_search: SearchObserver | None = None
    ) -> list[Recommendation]:
        """Answer ``queries`` (one encoder batch and one index search for all of them).

        A query with no known history item gets the popularity fallback (most popular items
        first, exclusions applied).
        """
        prepared = [self._prepare(q) for q in queries]
        answers: list[Recommendation | None] = [None] * len(queries)
        rows = [i for i, p in enumerate(prepared) if p.history]
        if rows:
            users = self.encode(
                [prepared[i].history for i in rows],
                {n: [prepared[i].codes[n] for i in rows] for n in self._vocab},
            )
            k = min(max(queries[i].k for i in rows), self.num_items)
            start = time.perf_counter()
            scores, ids = self.index.search(users, k, exclude=[prepared[i].excluded for i in rows])
            if on_search is not None:
                on_search(self.index.kind, time.perf_counter() - start)
            for r, i in enumerate(rows):
                top = queries[i].k
                items = self._scored(ids[r, :top], scores[r, :top])
                answers[i] = self._answer("model", items, prepared[i])
        for i, p in enumerate(prepared):
            if answers[i] is None:
                answers[i] = self._answer("popularity", self._popular_items(queries[i].k, p), p)
        return answers  # type: ignore[return-value]

    def similar(
        self, item_id: str, k: int, on_search: SearchObserver | None = None
    ) -> list[ScoredItem]:
        """The ``k`` items with the largest ``w_i · w_j`` for item ``i = item_id`` (itself excluded).

        Raises:
            UnknownItemError: ``item_id`` is not in the catalogue.
        """
        _check_k(k)
        row = self._item_row.get(item_id)
        if row is None:
            raise UnknownItemError(
                f"unknown item id {item_id!r}: not in the catalogue of model "
                f"{self.model_version} ({self.num_items} items)"
            )
        fetch = min(k, self.num_items - 1)
        if fetch < 1:
            return []
        start = time.perf_counter()
        scores, ids = self.index.search(
            self._output[row : row + 1], fetch, exclude=[[row]], bias_weight=0.0
        )
        if on_search is not None:
            on_search(self.index.kind, time.perf_counter() - start)
        return self._scored(ids[0], scores[0])

    def summary(self) -> dict[str, Any]:
        """Manifest summary, index kind/parameters and measured recall (for ``GET /v1/model``)."""
        manifest = self.artifacts.manifest
        info = self.index_info
        recall = info.recall
        return {
            "model_version": self.model_version,
            "created": manifest.created,
            "artifacts": str(self.artifacts.path),
            "name": manifest.config.get("name"),
            "num_items": self.num_items,
            "num_users": len(self.artifacts.user_ids),
            "embedding_dim": self.dim,
            "max_history": self.max_history,
            "tower": self.artifacts.model.tower,
            "holdout": manifest.holdout,
            "user_features": self.feature_names,
            "metrics": manifest.metrics,
            "loaded_at": self.loaded_at,
            "index": {
                "kind": info.kind,
                "params": info.params,
                "source": info.source,
                "path": info.path,
                "seconds": info.seconds,
                "recall": recall._asdict() if recall is not None else None,
            },
        }

    # ------------------------------------------------------------------ helpers

    def _prepare(self, query: UserQuery) -> _Prepared:
        _check_k(query.k)
        unknown: list[str] = []
        known = self._rows(query.history, unknown)
        excluded = set(known) if query.exclude_history else set()
        excluded.update(self._rows(query.exclude, unknown))
        codes, ignored = self._codes(query.user_id, query.features)
        return _Prepared(
            history=known[-self.max_history :],
            excluded=np.array(list(excluded), dtype=np.int64),
            codes=codes,
            unknown_items=list(dict.fromkeys(unknown)),
            ignored_features=ignored,
        )

    def _rows(self, item_ids: Sequence[str], unknown: list[str]) -> list[int]:
        """The internal rows of the known ``item_ids``, in order; the others go to ``unknown``."""
        rows = []
        get = self._item_row.get
        for item in item_ids:
            row = get(item)
            if row is None:
                unknown.append(item)
            else:
                rows.append(row)
        return rows

    def _codes(
        self, user_id: str | None, features: Mapping[str, str] | None
    ) -> tuple[dict[str, int], list[str]]:
        """Feature codes: the user's from the artifacts, overridden by given raw values."""
        row = self._user_row.get(user_id) if user_id is not None else None
        codes = {
            name: int(self.artifacts.user_features[name][row])
            if row is not None and name in self.artifacts.user_features
            else 0
            for name in self._vocab
        }
        ignored = []
        for name, value in (features or {}).items():
            vocab = self._vocab.get(name)
            if vocab is None:
                ignored.append(name)
            else:
                codes[name] = vocab.get(str(value), 0)
        return codes, sorted(ignored)

    def _scored(self, ids: np.ndarray, scores: np.ndarray) -> list[ScoredItem]:
        item_ids = self.artifacts.item_ids
        return [
            ScoredItem(str(item_ids[i]), float(s), self._titles[i])
            for i, s in zip(ids.tolist(), scores.tolist())
            if i >= 0
        ]

    def _popular_items(self, k: int, prepared: _Prepared) -> list[ScoredItem]:
        candidates = self._popular[: k + prepared.excluded.size]
        if prepared.excluded.size:
            candidates = candidates[~np.isin(candidates, prepared.excluded)]
        top = candidates[:k]
        return self._scored(top, np.asarray(self.artifacts.popularity)[top].astype(np.float64))

    def _answer(
        self, source: Source, items: list[ScoredItem], prepared: _Prepared
    ) -> Recommendation:
        return Recommendation(
            model_version=self.model_version,
            source=source,
            items=items,
            history_length=len(prepared.history) if source == "model" else 0,
            unknown_items=prepared.unknown_items,
            ignored_features=prepared.ignored_features,
        )


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}.")
    return int(k)
