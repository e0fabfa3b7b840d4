"""Recall@k of an approximate index against exact search: measured and returned, never set on
the index (the caller keeps it, e.g. beside the saved index)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from service.index.checks import check_int
from service.index.item_index import ItemIndex

logger = logging.getLogger(__name__)


class RecallReport(NamedTuple):
    """A measured recall@k of an approximate index against the exact one."""

    recall: float
    k: int
    num_queries: int


def measure_recall(
    index: ItemIndex, exact_index: ItemIndex, queries: np.ndarray, k: int
) -> RecallReport:
    """Recall@k of ``index`` against ``exact_index`` on ``queries [n, d]``.

    ``|approx top-k ∩ exact top-k| / |exact top-k|`` summed over queries. Both indexes must
    hold the same items.
    """
    if index.dim != exact_index.dim or index.ntotal != exact_index.ntotal:
        raise ValueError(
            f"index and exact_index must hold the same items, got dim {index.dim} / "
            f"{exact_index.dim} and ntotal {index.ntotal} / {exact_index.ntotal}; build both "
            "from the same item_vectors."
        )
    k = check_int(k, "k", 1)
    _, approx_ids = index.search(queries, k)
    _, exact_ids = exact_index.search(queries, k)
    hits = 0
    total = 0
    for approx_row, exact_row in zip(approx_ids, exact_ids):
        truth = exact_row[exact_row >= 0]
        total += truth.size
        hits += int(np.isin(truth, approx_row).sum())
    recall = hits / total if total else 1.0
    logger.info("%s recall@%d = %.4f on %d queries", index.kind, k, recall, approx_ids.shape[0])
    return RecallReport(recall=recall, k=k, num_queries=int(approx_ids.shape[0]))
