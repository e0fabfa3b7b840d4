"""`ItemIndex`: top-k search over items scored ``u · w_i + b_i``, whatever the FAISS kind.

The index validates its input, augments items and queries (`service.index.mips`), asks its
kind's backend (`service.index.backends`) for candidates, then re-scores them exactly, drops
exclusions and orders the results; an approximate row short of candidates falls back to brute
force.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from service.index.backends import Backend, new_backend, set_num_threads
from service.index.checks import (
    check_exclude,
    check_int,
    check_matrix,
    excluded_mask,
    matrix_dim,
)
from service.index.mips import augment_items, augment_queries
from service.index.params import IndexParams

logger = logging.getLogger(__name__)

# Re-scoring gathers [rows, fetch, d + 1] float64 values; keep one chunk below ~32 MiB.
_RESCORE_CHUNK_ELEMENTS = 4_000_000


class ItemIndex:
    """Top-k maximum-inner-product search over items scored ``u · w_i + b_i``.

    Args:
        kind: ``"exact"``, ``"ivf"`` or ``"hnsw"`` (see `service.index.backends`).
        dim: ``d``, the dimension of user vectors and item weight rows (without the bias).
        params: build/search parameters; defaults to ``IndexParams()``.
    """

    def __init__(self, kind: str, dim: int, params: IndexParams | None = None) -> None:
        self._dim = check_int(dim, "dim", 1)
        self._params = IndexParams.of(params)
        self._backend: Backend = new_backend(kind, self._dim, self._params)
        self._items = np.empty((0, self._dim + 1), dtype=np.float32)  # [N, d + 1]
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        return self._backend.kind

    @property
    def is_exact(self) -> bool:
        return self._backend.is_exact

    @property
    def backend(self) -> Backend:
        """The kind's FAISS backend (e.g. ``backend.nprobe`` of an IVF index)."""
        return self._backend

    @property
    def dim(self) -> int:
        """``d``: the user-vector dimension (item vectors are ``[N, d]``, bias ``[N]``)."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of items in the index."""
        return int(self._items.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def params(self) -> IndexParams:
        return self._params

    @property
    def item_vectors(self) -> np.ndarray:
        """Read-only view of the stored item weights, float32 ``[N, d]``."""
        view = self._items[:, : self._dim]
        view.flags.writeable = False
        return view

    @property
    def item_bias(self) -> np.ndarray:
        """Read-only view of the stored item biases, float32 ``[N]``."""
        view = self._items[:, self._dim]
        view.flags.writeable = False
        return view

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the stored item vectors and biases (detects an index built for other data)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self._items)
        return self._fingerprint

    def matches(self, item_vectors: np.ndarray, item_bias: np.ndarray | None = None) -> bool:
        """Whether this index holds exactly ``item_vectors [N, d]`` and ``item_bias [N]``."""
        augmented = augment_items(item_vectors, item_bias, self._dim)
        if augmented.shape != self._items.shape:
            return False
        return _fingerprint(augmented) == self.fingerprint

    def __repr__(self) -> str:
        return f"ItemIndex({self.kind!r}, dim={self._dim}, ntotal={self.ntotal}, {self._params!r})"

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change search-time parameters in place (``None`` keeps a value); no rebuild.

        For sweeps (recall versus speed) on one built index; a search running concurrently
        on another thread uses either the old or the new value.
        """
        changes: dict[str, int] = {}
        if nprobe is not None:
            changes["nprobe"] = check_int(nprobe, "nprobe", 1)
        if ef_search is not None:
            changes["ef_search"] = check_int(ef_search, "ef_search", 1)
        self._params = self._params.model_copy(update=changes)
        self._backend.set_params(self._params)

    # ------------------------------------------------------------------ building

    def build(self, item_vectors: np.ndarray, item_bias: np.ndarray | None = None) -> ItemIndex:
        """Replace the contents with ``item_vectors [N, d]`` and ``item_bias [N]`` (None: zeros).

        Trains the index where the kind needs it (IVF k-means) and adds all items; ids are
        ``0 .. N-1``. Returns ``self``.
        """
        augmented = augment_items(item_vectors, item_bias, self._dim)
        if augmented.shape[0] == 0:
            raise ValueError(
                "item_vectors must hold at least one item to build an index, got shape "
                f"{tuple(np.shape(item_vectors))}; pass the [N, d] item weight matrix."
            )
        start = time.perf_counter()
        self._backend.build(augmented)
        self._items = augmented
        self._fingerprint = None
        logger.info(
            "built %s index: %d items, dim %d, %.2fs",
            self.kind,
            self.ntotal,
            self._dim,
            time.perf_counter() - start,
        )
        return self

    def add(self, item_vectors: np.ndarray, item_bias: np.ndarray | None = None) -> None:
        """Append items ``item_vectors [M, d]``, ``item_bias [M]``; they get ids ``N .. N+M-1``.

        An empty index is built instead (same as `build`). Approximate kinds keep the structure
        learned at build time (IVF centroids, the MIPS norm bound): items whose augmented norm
        exceeds the bound raise ValueError; rebuild with all items then.
        """
        if self._backend.faiss is None:
            self.build(item_vectors, item_bias)
            return
        augmented = augment_items(item_vectors, item_bias, self._dim)
        if augmented.shape[0] == 0:
            return
        self._backend.add(augmented)
        self._items = np.concatenate([self._items, augmented], axis=0)
        self._fingerprint = None

    def restore(self, faiss_index: Any, meta: Mapping[str, Any]) -> None:
        """Adopt a FAISS object read from disk (see `service.index.persistence`) and recover
        the augmented items ``[N, d+1]`` from it."""
        self._backend.restore(faiss_index, dict(meta))
        ntotal = int(faiss_index.ntotal)
        width = self._dim + 1
        if ntotal == 0:
            self._items = np.empty((0, width), dtype=np.float32)
        else:
            stored = faiss_index.reconstruct_n(0, ntotal)
            self._items = np.ascontiguousarray(stored[:, :width], dtype=np.float32)
        self._fingerprint = None

    # ------------------------------------------------------------------ searching

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Iterable[int]] | None = None,
        *,
        bias_weight: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items by ``u · w_i + bias_weight * b_i`` for each query.

        Args:
            queries: user vectors ``[n, d]`` (float32; other real dtypes are converted).
            k: results per query, ``>= 1``.
            exclude: optional, one iterable of item ids per query (``n`` of them) that must not
                be returned (e.g. already watched items). Ids outside ``0 .. N-1`` are ignored.
            bias_weight: coefficient of the item bias (the last coordinate of the augmented
                query ``[u, bias_weight]``); 1 ranks by the model score, 0 by ``u · w_i`` alone
                (e.g. item-to-item similarity with ``u = w_j``).

        Returns:
            ``(scores, ids)``: float32 ``[n, k]`` exact scores, descending, and int64 ``[n, k]``
            item ids; rows with fewer than ``k`` eligible items are padded with score ``-inf``
            and id ``-1``.
        """
        q = check_matrix(queries, "queries", self._dim, "user vectors from the user tower")
        k = check_int(k, "k", 1)
        if not math.isfinite(bias_weight):
            raise ValueError(f"bias_weight must be a finite number, got {bias_weight!r}.")
        n = q.shape[0]
        excluded = check_exclude(exclude, n, self.ntotal)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or self.ntotal == 0:
            return scores, ids

        q_aug = augment_queries(q, bias_weight)
        # Each row fetches k + (its own number of exclusions) candidates, rounded up to a power
        # of two so that rows with similar needs share one FAISS call, and drops its excluded
        # items after an exact re-score. A row's result depends on its own query and
        # exclusions only: one user with a long history does not make every query of a batch
        # fetch (and re-score) that many. (Searching with a FAISS ID selector instead was no
        # more accurate at equal cost, and less so with many exclusions.)
        num_excluded = (
            np.array([e.size for e in excluded], dtype=np.int64)
            if excluded
            else np.zeros(n, dtype=np.int64)
        )
        fetch_of_row = np.minimum(
            self.ntotal, 1 << np.ceil(np.log2(k + num_excluded)).astype(np.int64)
        )
        for fetch in np.unique(fetch_of_row).tolist():
            rows = np.flatnonzero(fetch_of_row == fetch)
            candidates = self._backend.search(q_aug[rows], fetch)  # int64 [rows, fetch]; -1 none
            rows_excluded = [excluded[r] for r in rows] if excluded else None
            self._fill(q_aug, rows, candidates, rows_excluded, scores, ids)

        # An approximate index may return fewer valid candidates than asked (IVF lists
        # exhausted, excluded items crowding the top): such rows fall back to brute force.
        expected = np.minimum(k, self.ntotal - num_excluded)
        short_rows = np.flatnonzero(np.count_nonzero(ids >= 0, axis=1) < expected)
        if short_rows.size:
            logger.debug(
                "%s search: %d of %d rows short of candidates; exact fallback",
                self.kind,
                short_rows.size,
                n,
            )
        for r in short_rows:
            scores[r], ids[r] = self._brute_force_row(
                q_aug[r], k, excluded[r] if excluded else None
            )
        return scores, ids

    def _fill(
        self,
        q_aug: np.ndarray,
        rows: np.ndarray,
        candidates: np.ndarray,
        excluded: list[np.ndarray] | None,
        scores: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        """Re-score ``candidates [len(rows), m]`` exactly, drop exclusions, write the best
        ``min(k, m)`` of each row into ``scores[rows]`` / ``ids[rows]`` (score desc, id asc)."""
        fetch = candidates.shape[1]
        take = min(scores.shape[1], fetch)
        rows_per_chunk = max(1, _RESCORE_CHUNK_ELEMENTS // (fetch * (self._dim + 1)))
        for start in range(0, rows.size, rows_per_chunk):
            chunk = rows[start : start + rows_per_chunk]
            cand = candidates[start : start + rows_per_chunk]
            cand_scores = self._exact_scores(q_aug[chunk], cand)
            if excluded is not None:
                mask = excluded_mask(cand, excluded[start : start + rows_per_chunk])
                cand_scores[mask] = -np.inf
            order = np.lexsort((cand, -cand_scores), axis=-1)[:, :take]
            top_scores = np.take_along_axis(cand_scores, order, axis=1)
            top_ids = np.take_along_axis(cand, order, axis=1)
            top_ids[~np.isfinite(top_scores)] = -1
            scores[chunk, :take] = top_scores
            ids[chunk, :take] = top_ids

    def _exact_scores(self, q_aug: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact ``q · x_id`` in float64 for ``q_aug [n, d+1]``, ``ids [n, m]`` -> ``[n, m]``.

        Missing ids (-1) score ``-inf``.
        """
        valid = ids >= 0
        gathered = self._items[np.where(valid, ids, 0)].astype(np.float64)  # [n, m, d+1]
        out = np.einsum("nmd,nd->nm", gathered, q_aug.astype(np.float64))
        out[~valid] = -np.inf
        return out

    def _brute_force_row(
        self, q_aug: np.ndarray, k: int, excluded: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of one augmented query ``[d+1]`` -> (scores ``[k]``, ids ``[k]``).

        A float32 pass over all ``N`` items keeps a margin of candidates, which are then
        re-scored in float64 like every other result.
        """
        rough = self._items @ q_aug  # float32 [N]
        if excluded is not None and excluded.size:
            rough[excluded] = -np.inf
        keep = min(2 * k + 16, rough.shape[0])
        cand = np.argpartition(-rough, keep - 1)[:keep].astype(np.int64)
        cand = cand[np.isfinite(rough[cand])]
        cand_scores = self._exact_scores(q_aug[None, :], cand[None, :])[0]
        order = np.lexsort((cand, -cand_scores))[:k]
        take = order.shape[0]
        scores = np.full(k, -np.inf, dtype=np.float32)
        ids = np.full(k, -1, dtype=np.int64)
        scores[:take] = cand_scores[order]
        ids[:take] = cand[order]
        return scores, ids


def build_index(
    kind: str,
    item_vectors: np.ndarray,
    item_bias: np.ndarray | None = None,
    params: IndexParams | Mapping[str, Any] | None = None,
) -> ItemIndex:
    """Build an index of ``kind`` ("exact" | "ivf" | "hnsw") over items.

    Args:
        item_vectors: item weight rows ``[N, d]``.
        item_bias: item biases ``[N]`` (None: zeros).
        params: `IndexParams` (or settings extending it) or a dict of its fields;
            ``num_threads`` is applied first.
    """
    params = IndexParams.of(params)
    set_num_threads(params.num_threads)
    return ItemIndex(kind, matrix_dim(item_vectors), params).build(item_vectors, item_bias)


def _fingerprint(augmented: np.ndarray) -> str:
    digest = hashlib.sha256(f"float32:{augmented.shape[0]}x{augmented.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(augmented, dtype=np.float32).tobytes())
    return digest.hexdigest()
