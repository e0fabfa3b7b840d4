"""Top-k maximum-inner-product retrieval over item embeddings with FAISS (numpy and faiss only).

No web framework: the CLI, the service and the benchmarks share it.

* Scoring: item ``i`` scores ``u · w_i + b_i`` for a user vector ``u``; every kind searches the
  augmented items ``[w_i, b_i]`` with queries ``[u, 1]`` (`service.index.mips`).
* Kinds (`service.index.backends`): ``"exact"`` (brute force), ``"hnsw"``, ``"ivf"``, behind
  one `ItemIndex` (`service.index.item_index`) configured by `IndexParams`.
* Returned scores: whatever the kind, the candidates found by FAISS are re-scored from the
  stored augmented vectors in float64 (then rounded to float32), so a returned score always
  equals the true ``u · w_i + b_i`` of the returned id and the kinds agree on it; results are
  ordered by score descending, ties by smaller id.
* Ids are row positions ``0 .. N-1`` in the order items were added; the caller maps them to its
  own item ids. Missing results (``k`` larger than what is left) are padded with id ``-1`` and
  score ``-inf``.
* Persistence: `save_index` / `load_index` (`service.index.persistence`); recall against
  exact search: `measure_recall` returns a `RecallReport` (`service.index.recall`).
* Threads: FAISS releases the GIL while it searches, so searches may run in a thread pool.
  Concurrent ``search`` calls are safe; ``add``/``build`` must not run concurrently with
  searches on the same object: build a new index and swap the reference instead. FAISS's
  OpenMP thread count is process-global; see `set_num_threads`.
"""

from service.index.backends import auto_nlist, set_num_threads
from service.index.item_index import ItemIndex, build_index
from service.index.params import INDEX_KINDS, IndexKind, IndexParams, IndexSettings
from service.index.persistence import INDEX_FILE, META_FILE, load_index, save_index
from service.index.recall import RecallReport, measure_recall

__all__ = [
    "INDEX_FILE",
    "INDEX_KINDS",
    "META_FILE",
    "IndexKind",
    "IndexParams",
    "IndexSettings",
    "ItemIndex",
    "RecallReport",
    "auto_nlist",
    "build_index",
    "load_index",
    "measure_recall",
    "save_index",
    "set_num_threads",
]
