"""The FAISS side of each index kind: a small backend object per kind, held by `ItemIndex`.

* ``"exact"``: ``faiss.IndexFlatIP`` over the augmented items ``[w, b]``; brute force, exact.
* ``"hnsw"``: ``faiss.IndexHNSWFlat``; by default (``hnsw_metric="ip"``) a graph built and
  searched with the inner product itself; with ``hnsw_metric="l2"`` an L2 graph over the
  MIPS-to-L2 transform (see `service.index.mips`).
* ``"ivf"``: ``faiss.IndexIVFFlat`` (L2, with an L2 coarse quantizer) over the MIPS-to-L2
  transform.

Every backend has the same small surface: ``build(augmented)`` (a new FAISS object, trained
where needed, holding the items), ``add(augmented)``, ``search(q_aug, fetch) -> ids``,
``set_params(params)`` for search-time parameters, and ``meta()`` / ``restore(faiss, meta)``
for persistence. ``max_norm_sq`` is the MIPS bound of a transforming backend (None: FAISS sees
the augmented vectors as they are).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import faiss
import numpy as np

from service.index.checks import check_int
from service.index.mips import mips_items, mips_queries, squared_norms
from service.index.params import INDEX_KINDS, IndexParams

logger = logging.getLogger(__name__)


def set_num_threads(num_threads: int | None) -> None:
    """Set FAISS's OpenMP thread count (process-global); ``None`` leaves it unchanged.

    FAISS parallelises one batched search over queries. When searches also run concurrently
    from a Python thread pool, ``workers x num_threads`` above the core count oversubscribes
    the CPU; a service usually wants ``num_threads = cores // concurrent searches`` (often 1).
    """
    if num_threads is None:
        return
    num_threads = check_int(num_threads, "num_threads", 1)
    faiss.omp_set_num_threads(num_threads)
    logger.debug("faiss OpenMP threads set to %d", num_threads)


class _Backend:
    """What the kinds share: the parameters, the FAISS object, the optional MIPS bound."""

    kind: ClassVar[str]
    is_exact: ClassVar[bool] = False

    def __init__(self, dim: int, params: IndexParams, transform: bool = False) -> None:
        self.dim = dim
        self.params = params
        self.transform = transform  # FAISS holds MIPS-to-L2 transformed vectors
        self.faiss: Any = None
        self.max_norm_sq: float | None = None  # the transform's bound, set by `build`

    @property
    def width(self) -> int:
        """Width of the vectors FAISS stores: ``d + 1``, or ``d + 2`` with the transform."""
        return self.dim + (2 if self.transform else 1)

    def add(self, augmented: np.ndarray) -> None:
        """Append augmented items ``[M, d+1]`` to the FAISS object."""
        self.faiss.add(self._faiss_items(augmented))

    def set_params(self, params: IndexParams) -> None:
        self.params = params

    def meta(self) -> dict[str, Any]:
        return {}

    def restore(self, faiss_index: Any, meta: dict[str, Any]) -> None:
        """Adopt a FAISS object read from disk, with the `meta` saved beside it."""
        self.faiss = faiss_index
        if meta.get("max_norm_sq") is not None:
            self.max_norm_sq = float(meta["max_norm_sq"])

    def _set_bound(self, augmented: np.ndarray) -> None:
        self.max_norm_sq = float(squared_norms(augmented).max()) if self.transform else None

    def _faiss_items(self, augmented: np.ndarray) -> np.ndarray:
        if self.max_norm_sq is None:
            return augmented
        return mips_items(augmented, self.max_norm_sq)

    def _faiss_queries(self, q_aug: np.ndarray) -> np.ndarray:
        if self.max_norm_sq is None:
            return q_aug
        return mips_queries(q_aug, self.max_norm_sq)

    def _transform_meta(self) -> dict[str, Any]:
        return {
            "max_norm_sq": self.max_norm_sq,
            "transform": "mips_to_l2" if self.transform else None,
        }


class ExactBackend(_Backend):
    """Brute-force inner product (``faiss.IndexFlatIP``); exact, ``O(N d)`` per query."""

    kind = "exact"
    is_exact = True

    def build(self, augmented: np.ndarray) -> None:
        self.faiss = faiss.IndexFlatIP(self.width)
        self.add(augmented)

    def search(self, q_aug: np.ndarray, fetch: int) -> np.ndarray:
        """Candidate ids int64 ``[n, fetch]`` (-1 = none) for augmented queries ``[n, d+1]``."""
        _, ids = self.faiss.search(q_aug, fetch)
        return ids


class HNSWBackend(_Backend):
    """HNSW graph (``faiss.IndexHNSWFlat``): ``hnsw_m``, ``hnsw_metric``, ``ef_construction``,
    ``ef_search``."""

    kind = "hnsw"

    def __init__(self, dim: int, params: IndexParams) -> None:
        super().__init__(dim, params, transform=params.hnsw_metric == "l2")

    def build(self, augmented: np.ndarray) -> None:
        self._set_bound(augmented)
        metric = faiss.METRIC_L2 if self.transform else faiss.METRIC_INNER_PRODUCT
        self.faiss = faiss.IndexHNSWFlat(self.width, self.params.hnsw_m, metric)
        self.faiss.hnsw.efConstruction = self.params.ef_construction
        self.faiss.hnsw.efSearch = self.params.ef_search
        self.add(augmented)

    def search(self, q_aug: np.ndarray, fetch: int) -> np.ndarray:
        params = faiss.SearchParametersHNSW(efSearch=max(self.params.ef_search, fetch))
        _, ids = self.faiss.search(self._faiss_queries(q_aug), fetch, params=params)
        return ids

    def set_params(self, params: IndexParams) -> None:
        self.params = params
        if self.faiss is not None:
            self.faiss.hnsw.efSearch = params.ef_search

    def meta(self) -> dict[str, Any]:
        return self._transform_meta()

    def restore(self, faiss_index: Any, meta: dict[str, Any]) -> None:
        super().restore(faiss_index, meta)
        faiss_index.hnsw.efSearch = self.params.ef_search


def auto_nlist(num_items: int) -> int:
    """``4 sqrt(N)`` lists, at most ``N // 39`` (FAISS wants >= 39 points per centroid)."""
    return max(1, min(int(4 * math.sqrt(num_items)), num_items // 39))


class IVFBackend(_Backend):
    """Inverted lists (``faiss.IndexIVFFlat``, L2 quantizer) over MIPS-transformed items:
    ``nlist`` (None = `auto_nlist`), ``nprobe``, ``seed``."""

    kind = "ivf"

    def __init__(self, dim: int, params: IndexParams) -> None:
        super().__init__(dim, params, transform=True)
        self.nlist: int | None = None  # of the built index
        self._quantizer: Any = None  # kept alive: the IVF object built here does not own it

    @property
    def nprobe(self) -> int:
        """Lists visited per query: ``params.nprobe`` clipped to ``nlist``."""
        return min(self.params.nprobe, self.nlist or self.params.nprobe)

    def build(self, augmented: np.ndarray) -> None:
        num_items = augmented.shape[0]
        nlist = self.params.nlist if self.params.nlist is not None else auto_nlist(num_items)
        if nlist > num_items:
            raise ValueError(
                f"nlist must be <= the number of items to train k-means, got nlist={nlist} for "
                f"{num_items} items; use nlist <= {max(1, num_items // 39)} (or None for auto)."
            )
        if self.params.nprobe > nlist:
            logger.warning(
                "nprobe=%d > nlist=%d; using nprobe=%d", self.params.nprobe, nlist, nlist
            )
        self._set_bound(augmented)
        self.nlist = nlist
        quantizer = faiss.IndexFlatL2(self.width)
        index = faiss.IndexIVFFlat(quantizer, self.width, nlist, faiss.METRIC_L2)
        index.cp.seed = self.params.seed
        index.train(self._faiss_items(augmented))
        index.nprobe = self.nprobe
        index.make_direct_map()  # lets a load recover the stored vectors with reconstruct_n
        self.faiss, self._quantizer = index, quantizer
        self.add(augmented)

    def search(self, q_aug: np.ndarray, fetch: int) -> np.ndarray:
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, ids = self.faiss.search(self._faiss_queries(q_aug), fetch, params=params)
        return ids

    def set_params(self, params: IndexParams) -> None:
        self.params = params
        if self.faiss is not None:
            self.faiss.nprobe = self.nprobe

    def meta(self) -> dict[str, Any]:
        return {**self._transform_meta(), "nlist": self.nlist}

    def restore(self, faiss_index: Any, meta: dict[str, Any]) -> None:
        self.nlist = int(faiss_index.nlist)
        faiss_index.nprobe = self.nprobe
        super().restore(faiss_index, meta)


Backend = ExactBackend | HNSWBackend | IVFBackend

_BACKENDS: dict[str, type[Backend]] = {
    "exact": ExactBackend,
    "ivf": IVFBackend,
    "hnsw": HNSWBackend,
}


def new_backend(kind: object, dim: int, params: IndexParams) -> Backend:
    """An empty backend of ``kind`` ("exact" | "ivf" | "hnsw")."""
    if kind not in _BACKENDS:
        raise ValueError(
            f"index kind must be one of {INDEX_KINDS}, got {kind!r}; use 'exact' for brute "
            "force, 'hnsw' or 'ivf' for approximate search."
        )
    return _BACKENDS[kind](dim, params)  # type: ignore[index]
