"""Pure transforms of the index: the bias augmentation and the MIPS-to-L2 transform.

Augmentation. Item ``i`` scores ``u · w_i + b_i`` for a user vector ``u``. The indexes store the
augmented items ``x_i = [w_i, b_i]`` (``[N, d + 1]``) and search with augmented queries
``q = [u, bias_weight]``, so the bias takes part in the ranking, not only in a re-score.

MIPS-to-L2 transform (Bachrach et al. 2014). With ``M² = max_i ||x_i||²`` the items become
``z_i = [x_i, sqrt(M² - ||x_i||²)]`` (all of norm ``M``) and the queries ``[q, 0]``; then
``||[q, 0] - z_i||² = ||q||² + M² - 2 q·x_i``, so the L2 nearest neighbours are exactly the
largest inner products whatever the item norms. Queries are also rescaled to norm ``M``
(ranking unchanged) so that the IVF coarse quantizer compares them with centroids by angle.

Why HNSW defaults to the inner-product graph: both are exact reductions (same top-k in the
limit), but when item norms vary the transform pushes small-norm items together near one pole
of the sphere and the L2 graph navigates poorly towards the large-inner-product items. On
seeded synthetic data (20k items, d = 32/64, norms varying) recall@10 at ``ef_search=64`` was
0.07-0.90 with the transform and 0.93-1.00 with the inner-product graph (same ``M``,
``ef_construction``); cf. Morozov & Babenko, "Non-metric similarity graphs for maximum inner
product search" (NeurIPS 2018). For IVF the transform wins instead (k-means on raw inner
products gives unbalanced, norm-driven lists: recall@10 0.29-0.31 vs 0.81-0.84 at nprobe 8 on
low-rank data), so IVF always uses it.
"""

from __future__ import annotations

import math

import numpy as np

from service.index.checks import check_matrix


def augment_items(item_vectors: object, item_bias: object, dim: int) -> np.ndarray:
    """``[w, b]`` float32 ``[N, d+1]`` from ``item_vectors [N, d]`` and ``item_bias [N]``
    (None: zeros), checked."""
    w = check_matrix(item_vectors, "item_vectors", dim, "the item weight matrix")
    num_items = w.shape[0]
    if item_bias is None:
        b = np.zeros(num_items, dtype=np.float32)
    else:
        b_arr = np.asarray(item_bias)
        if b_arr.ndim != 1 or b_arr.shape[0] != num_items:
            raise ValueError(
                f"item_bias must have shape [{num_items}] (one bias per item), got "
                f"{b_arr.shape}; pass the output-layer bias vector or None for zeros."
            )
        b = check_matrix(b_arr[:, None], "item_bias", 1, "the item bias vector")[:, 0]
    out = np.empty((num_items, dim + 1), dtype=np.float32)
    out[:, :dim] = w
    out[:, dim] = b
    return out


def augment_queries(queries: np.ndarray, bias_weight: float) -> np.ndarray:
    """``[u, bias_weight]`` float32 ``[n, d+1]`` from checked ``queries [n, d]``."""
    n, dim = queries.shape
    out = np.empty((n, dim + 1), dtype=np.float32)
    out[:, :dim] = queries
    out[:, dim] = bias_weight
    return out


def squared_norms(x: np.ndarray) -> np.ndarray:
    """float64 ``[n]``: ``||x_r||²`` of each row of ``x [n, w]``."""
    return np.einsum("nd,nd->n", x.astype(np.float64), x)


def mips_items(augmented: np.ndarray, max_norm_sq: float) -> np.ndarray:
    """``[M, d+1]`` augmented items -> ``[M, d+2]`` ``[x, sqrt(max_norm² - ||x||²)]``.

    Raises:
        ValueError: an item whose squared norm exceeds ``max_norm_sq`` (the bound is fixed when
            the index is built; rebuild it with all items).
    """
    norms_sq = squared_norms(augmented)
    bound = max_norm_sq * (1.0 + 1e-6) + 1e-12
    if np.any(norms_sq > bound):
        worst = int(np.argmax(norms_sq))
        raise ValueError(
            f"cannot add items whose squared norm of [w, b] exceeds the bound fixed at build "
            f"time ({max_norm_sq:.6g}): got {norms_sq[worst]:.6g} for row {worst}; rebuild the "
            "index with all items (build_index)."
        )
    width = augmented.shape[1]
    out = np.empty((augmented.shape[0], width + 1), dtype=np.float32)
    out[:, :width] = augmented
    out[:, width] = np.sqrt(np.maximum(max_norm_sq - norms_sq, 0.0))
    return out


def mips_queries(q_aug: np.ndarray, max_norm_sq: float) -> np.ndarray:
    """``[n, d+1]`` augmented queries -> ``[n, d+2]`` of norm ``max_norm``, last coordinate 0.

    Scaling a query by a positive factor does not change its ranking; on the sphere of the
    transformed items, L2 distance to a centroid reflects the angle, which is what the IVF
    coarse quantizer must compare (graph search is unaffected by the scale). An all-zero query
    stays zero.
    """
    q64 = q_aug.astype(np.float64)
    norms = np.sqrt(np.einsum("nd,nd->n", q64, q64))
    scale = math.sqrt(max_norm_sq) / np.maximum(norms, 1e-30)
    out = np.zeros((q_aug.shape[0], q_aug.shape[1] + 1), dtype=np.float32)
    out[:, : q_aug.shape[1]] = q64 * scale[:, None]
    return out
