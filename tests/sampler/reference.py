"""Float64 NumPy reference of TensorFlow's candidate sampling and sampled losses.

Written from TensorFlow's sources, independently of torch and of the ``sampler`` package:

* ``tensorflow/python/ops/embedding_ops.py`` (``embedding_lookup``, "mod"/"div" layouts, ``_clip``),
* ``tensorflow/core/kernels/candidate_sampler_ops.cc`` (``ComputeAccidentalHitsOp``),
* ``tensorflow/python/ops/nn_impl.py`` (``_compute_sampled_logits``, ``sampled_softmax_loss``,
  ``nce_loss``),
* ``tensorflow/core/kernels/range_sampler.cc`` (probabilities and ``ExpectedCountHelper``).

Everything here is float64 except the sampler formulas, which reproduce TensorFlow's float32
arithmetic. Gradients are analytic. Accidental hits that are masked contribute exactly zero
probability, loss and gradient (TensorFlow adds ``-FLT_MAX`` to the logit, whose ``exp`` and
``sigmoid`` are exactly 0 in float32).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)

# ----------------------------------------------------------------------------------------------
# Row layouts ("mod" / "div") and embedding_lookup
# ----------------------------------------------------------------------------------------------


def shard_sizes(num_rows: int, num_shards: int) -> list[int]:
    """Rows per shard: the first ``num_rows % num_shards`` shards hold one row more."""
    return [len(g) for g in layout(num_rows, num_shards, "mod")]


def layout(num_rows: int, num_shards: int, strategy: str) -> list[np.ndarray]:
    """Global ids held by each shard, in local-row order.

    "mod": shard p holds p, p + P, p + 2P, ... (TensorFlow: ``p = id % P``, ``local = id // P``).
    "div": contiguous ranges; the first ``num_rows % P`` shards are one row longer.
    """
    if strategy not in ("mod", "div"):
        raise ValueError(strategy)
    if num_shards == 1:
        return [np.arange(num_rows, dtype=np.int64)]
    if strategy == "mod":
        return [np.arange(p, num_rows, num_shards, dtype=np.int64) for p in range(num_shards)]
    out, start = [], 0
    for p in range(num_shards):
        size = num_rows // num_shards + (1 if p < num_rows % num_shards else 0)
        out.append(np.arange(start, start + size, dtype=np.int64))
        start += size
    return out


def locate(num_rows: int, num_shards: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """(shard_of, local_of), int64 ``[num_rows]`` each: where every global id lives."""
    shard_of = np.full(num_rows, -1, dtype=np.int64)
    local_of = np.full(num_rows, -1, dtype=np.int64)
    for p, g in enumerate(layout(num_rows, num_shards, strategy)):
        shard_of[g] = p
        local_of[g] = np.arange(len(g))
    assert (shard_of >= 0).all()
    return shard_of, local_of


def split_rows(table: np.ndarray, num_shards: int, strategy: str = "mod") -> list[np.ndarray]:
    return [table[g] for g in layout(table.shape[0], num_shards, strategy)]


def join_rows(shards: list[np.ndarray], strategy: str = "mod") -> np.ndarray:
    num_rows = sum(s.shape[0] for s in shards)
    lay = layout(num_rows, len(shards), strategy)
    assert [len(g) for g in lay] == [s.shape[0] for s in shards], "not a mod/div layout"
    out = np.empty((num_rows, *shards[0].shape[1:]), dtype=shards[0].dtype)
    for g, s in zip(lay, shards):
        out[g] = s
    return out


def _as_list(params) -> tuple[list[np.ndarray], bool]:
    if isinstance(params, (list, tuple)):
        return [np.asarray(p) for p in params], True
    return [np.asarray(params)], False


def full_table(params, strategy: str = "mod") -> np.ndarray:
    """The whole ``[num_rows, ...]`` table of a tensor or list of shards."""
    shards, _ = _as_list(params)
    return join_rows(shards, strategy) if len(shards) > 1 else shards[0]


def clip_rows(rows: np.ndarray, max_norm: float) -> np.ndarray:
    """TensorFlow's ``clip_by_norm`` per looked-up row: ``row * m / max(||row||, m)``."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        norms = np.abs(rows)
    else:
        norms = np.sqrt((rows.reshape(rows.shape[0], -1) ** 2).sum(1))
        norms = norms.reshape(-1, *([1] * (rows.ndim - 1)))
    return rows * max_norm / np.maximum(norms, max_norm)


def embedding_lookup(params, ids, strategy: str = "mod", max_norm=None) -> np.ndarray:
    """``tf.compat.v1.nn.embedding_lookup`` in float64: ``[*ids.shape, *row_shape]``."""
    table = full_table(params, strategy).astype(np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    rows = table[ids.reshape(-1)]
    if max_norm is not None:
        rows = clip_rows(rows, max_norm)
    return rows.reshape(*ids.shape, *table.shape[1:])


# ----------------------------------------------------------------------------------------------
# compute_accidental_hits
# ----------------------------------------------------------------------------------------------


def compute_accidental_hits(true_classes, sampled, num_true: int):
    """``ComputeAccidentalHitsOp``: (indices int32, ids int64, weights float32 = -FLT_MAX).

    A hash map from sampled id to its position is filled in order, so the LAST position of a
    repeated id wins; then rows and their true classes are scanned in order.
    """
    true_classes = np.asarray(true_classes, dtype=np.int64).reshape(-1, num_true)
    pos = {}
    for i, s in enumerate(np.asarray(sampled, dtype=np.int64).tolist()):
        pos[s] = i
    indices, ids = [], []
    for i, row in enumerate(true_classes.tolist()):
        for t in row:
            if t in pos:
                indices.append(i)
                ids.append(pos[t])
    n = len(indices)
    return (
        np.asarray(indices, dtype=np.int32).reshape(n),
        np.asarray(ids, dtype=np.int64).reshape(n),
        np.full(n, -FLT_MAX, dtype=np.float32),
    )


def accidental_hit_mask(true_classes, sampled, num_true: int) -> np.ndarray:
    """bool ``[batch, num_sampled]``: the entries TensorFlow's SparseToDense sets to -FLT_MAX."""
    true_classes = np.asarray(true_classes, dtype=np.int64).reshape(-1, num_true)
    mask = np.zeros((true_classes.shape[0], len(sampled)), dtype=bool)
    rows, cols, _ = compute_accidental_hits(true_classes, sampled, num_true)
    mask[rows, cols] = True
    return mask


# ----------------------------------------------------------------------------------------------
# _compute_sampled_logits, sampled_softmax_loss, nce_loss and their gradients
# ----------------------------------------------------------------------------------------------


class Logits:
    """Float64 logits of ``_compute_sampled_logits``.

    Attributes:
        logits: ``[B, T + S]``; masked accidental hits are ``-inf``.
        labels: ``[B, T + S]``: ``1 / T`` on the true columns, 0 elsewhere.
        mask: bool ``[B, T + S]``, True where an accidental hit was removed.
    """

    def __init__(self, logits, labels, mask):
        self.logits, self.labels, self.mask = logits, labels, mask


class Problem(NamedTuple):
    """The arguments that TensorFlow's sampled losses and ``_compute_sampled_logits`` share.

    ``weights`` and ``biases``: a table or a list of its shards (in the layout of the
    ``partition_strategy`` they are used with); ``sampled_values``: ``(sampled [S],
    true_expected_count [B, T], sampled_expected_count [S])``.
    """

    weights: Any
    biases: Any
    labels: Any
    inputs: Any
    sampled_values: Any
    num_true: int = 1


def _prepare(problem: Problem, strategy):
    num_true = problem.num_true
    w = full_table(problem.weights, strategy).astype(np.float64)
    b = full_table(problem.biases, strategy).astype(np.float64)
    x = np.asarray(problem.inputs, dtype=np.float64)
    labels = np.asarray(problem.labels, dtype=np.int64).reshape(x.shape[0], num_true)
    sampled, true_ec, sampled_ec = (np.asarray(v) for v in problem.sampled_values)
    sampled = sampled.astype(np.int64)
    true_ec = true_ec.astype(np.float64).reshape(x.shape[0], num_true)
    sampled_ec = sampled_ec.astype(np.float64).reshape(len(sampled))
    return w, b, x, labels, sampled, true_ec, sampled_ec


def compute_sampled_logits(
    problem: Problem,
    subtract_log_q: bool = True,
    remove_accidental_hits: bool = False,
    partition_strategy: str = "mod",
) -> Logits:
    num_true = problem.num_true
    w, b, x, labels, sampled, true_ec, sampled_ec = _prepare(problem, partition_strategy)
    true_logits = np.einsum("bd,btd->bt", x, w[labels]) + b[labels]
    sampled_logits = x @ w[sampled].T + b[sampled][None, :]
    if subtract_log_q:
        true_logits = true_logits - np.log(true_ec)
        sampled_logits = sampled_logits - np.log(sampled_ec)[None, :]
    mask_s = np.zeros(sampled_logits.shape, dtype=bool)
    if remove_accidental_hits:
        mask_s = accidental_hit_mask(labels, sampled, num_true)
        sampled_logits = np.where(mask_s, -np.inf, sampled_logits)
    logits = np.concatenate([true_logits, sampled_logits], 1)
    out_labels = np.concatenate(
        [np.full(true_logits.shape, 1.0 / num_true), np.zeros(sampled_logits.shape)], 1
    )
    mask = np.concatenate([np.zeros(true_logits.shape, dtype=bool), mask_s], 1)
    return Logits(logits, out_labels, mask)


def _softmax_loss_and_dlogits(lg: Logits) -> tuple[np.ndarray, np.ndarray]:
    z = lg.logits
    m = z.max(1, keepdims=True)
    e = np.where(lg.mask, 0.0, np.exp(np.where(lg.mask, 0.0, z - m)))
    s = e.sum(1, keepdims=True)
    lse = (m + np.log(s))[:, 0]
    zz = np.where(lg.mask, 0.0, z)  # masked columns have label 0
    loss = lse - (lg.labels * zz).sum(1)
    d = e / s - lg.labels
    return loss, np.where(lg.mask, 0.0, d)


def _sigmoid(z):
    return np.where(
        z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z)))
    )


def _nce_loss_and_dlogits(lg: Logits) -> tuple[np.ndarray, np.ndarray]:
    z = np.where(lg.mask, 0.0, lg.logits)
    y = lg.labels
    per = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    per = np.where(lg.mask, 0.0, per)
    d = np.where(lg.mask, 0.0, _sigmoid(z) - y)
    return per.sum(1), d


def _split_like(full: np.ndarray, like, strategy: str):
    shards, is_list = _as_list(like)
    if not is_list:
        return full
    return split_rows(full, len(shards), strategy) if len(shards) > 1 else [full]


def sampled_loss(
    kind: str,
    problem: Problem,
    remove_accidental_hits: bool | None = None,
    partition_strategy: str = "mod",
    upstream=None,
) -> dict:
    """Loss and analytic gradients of ``sampled_softmax_loss`` (kind "softmax") or ``nce_loss``.

    Args:
        kind: "softmax" or "nce".
        problem: the weights, biases, labels, inputs, sampled values and ``num_true``.
        remove_accidental_hits: None for the TensorFlow default of ``kind`` (True for softmax,
            False for NCE).
        upstream: ``[B]`` weights of the per-example losses in the scalar being differentiated
            (default all ones, i.e. the gradient of ``loss.sum()``).

    Returns:
        dict with ``loss [B]``, ``logits`` (:class:`Logits`), and the gradients of
        ``sum(upstream * loss)``: ``inputs [B, D]``, ``weights`` and ``biases`` shaped like the
        problem's (a list of shards in the same layout when a list was given).
    """
    if remove_accidental_hits is None:
        remove_accidental_hits = kind == "softmax"
    lg = compute_sampled_logits(problem, True, remove_accidental_hits, partition_strategy)
    if kind == "softmax":
        loss, g = _softmax_loss_and_dlogits(lg)
    elif kind == "nce":
        loss, g = _nce_loss_and_dlogits(lg)
    else:
        raise ValueError(kind)
    num_true = problem.num_true
    w, b, x, labels, sampled, _, _ = _prepare(problem, partition_strategy)
    up = np.ones(x.shape[0]) if upstream is None else np.asarray(upstream, dtype=np.float64)
    g = g * up[:, None]
    gt, gs = g[:, :num_true], g[:, num_true:]
    d_x = np.einsum("bt,btd->bd", gt, w[labels]) + gs @ w[sampled]
    d_w = np.zeros_like(w)
    np.add.at(d_w, labels.reshape(-1), (gt[:, :, None] * x[:, None, :]).reshape(-1, x.shape[1]))
    np.add.at(d_w, sampled, gs.T @ x)
    d_b = np.zeros_like(b)
    np.add.at(d_b, labels.reshape(-1), gt.reshape(-1))
    np.add.at(d_b, sampled, gs.sum(0))
    return {
        "loss": loss,
        "logits": lg,
        "inputs": d_x,
        "weights": _split_like(d_w, problem.weights, partition_strategy),
        "biases": _split_like(d_b, problem.biases, partition_strategy),
    }


def sampled_softmax_loss(weights, biases, labels, inputs, sampled_values, num_true=1, **kw):
    problem = Problem(weights, biases, labels, inputs, sampled_values, num_true)
    return sampled_loss("softmax", problem, **kw)


def nce_loss(weights, biases, labels, inputs, sampled_values, num_true=1, **kw):
    problem = Problem(weights, biases, labels, inputs, sampled_values, num_true)
    return sampled_loss("nce", problem, **kw)


# ----------------------------------------------------------------------------------------------
# Sampler formulas (float32, as range_sampler.cc computes them)
# ----------------------------------------------------------------------------------------------


def expected_count(p, num_sampled: int, num_tries: int) -> np.ndarray:
    """``ExpectedCountHelper`` in float32: ``p * S`` if ``num_tries == S``, else
    ``-expm1(num_tries * log1p(-p))``."""
    p = np.asarray(p, dtype=np.float32)
    if num_tries == num_sampled:
        return (p * np.float32(num_sampled)).astype(np.float32)
    t = np.float32(num_tries) * np.log1p(-p).astype(np.float32)
    return (-np.expm1(t.astype(np.float32))).astype(np.float32)


def uniform_probability(ids, range_max: int) -> np.ndarray:
    return np.full(np.shape(ids), np.float32(1.0 / range_max), dtype=np.float32)


def log_uniform_probability(ids, range_max: int) -> np.ndarray:
    k = np.asarray(ids, dtype=np.float64)
    return (np.log((k + 2.0) / (k + 1.0)) / math.log1p(range_max)).astype(np.float32)


def fixed_unigram_weights(
    unigrams,
    distortion: float = 1.0,
    num_reserved_ids: int = 0,
    num_shards: int = 1,
    shard: int = 0,
) -> tuple[np.ndarray, np.float32]:
    """(weights float32, total float32) of ``FixedUnigramSampler``, following its C++ loops.

    Reserved ids (weight 0) kept in this shard come first; then the unigrams are numbered from
    ``len(weights)`` (TensorFlow's counter starts at the number of reserved ids kept, not at
    ``num_reserved_ids``) and only those with ``word_id % num_shards == shard`` are kept, each
    raised to ``distortion`` in float32; the total is a float32 running sum.
    """
    weights = [np.float32(0.0) for i in range(num_reserved_ids) if i % num_shards == shard]
    total = np.float32(0.0)
    word_id = len(weights)
    d = np.float32(distortion)
    for u in unigrams:
        if word_id % num_shards == shard:
            w = np.float32(np.float32(u) ** d)
            total = np.float32(total + w)
            weights.append(w)
        word_id += 1
    return np.asarray(weights, dtype=np.float32), total


def fixed_unigram_probability(ids, weights: np.ndarray, total: np.float32) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(weights))
    w = weights[np.clip(ids, 0, len(weights) - 1)]
    return np.where(ok, (w / total).astype(np.float32), np.float32(0)).astype(np.float32)


def learned_unigram_probability(ids, counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    total = np.float32(counts.sum())
    return (counts[np.asarray(ids, dtype=np.int64)].astype(np.float32) / total).astype(np.float32)


def read_vocab_weights(path: str) -> list[float]:
    """The last comma-separated field of each line of a vocab file, as TensorFlow reads it."""
    with open(path, encoding="utf-8") as f:
        return [float(line.rstrip("\n").split(",")[-1]) for line in f]


def ordered_unique_probabilities(p, num_sampled: int) -> dict[tuple[int, ...], float]:
    """Exact law of the ordered ``num_sampled``-tuple from TensorFlow's rejection loop.

    Drawing i.i.d. from ``p`` and dropping repeats gives successive sampling without
    replacement: ``P(a1..ak) = prod_j p[a_j] / (1 - sum_{i<j} p[a_i])``.
    """
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    out = {}
    for tup in itertools.permutations(range(len(p)), num_sampled):
        prob, used = 1.0, 0.0
        for a in tup:
            prob *= p[a] / (1.0 - used)
            used += p[a]
        if prob > 0:
            out[tup] = prob
    return out


def expected_num_tries(p, num_sampled: int) -> float:
    """E[number of draws] of the rejection loop: given the ordered picks, each new distinct id
    needs a geometric number of draws with success probability ``1 - mass already picked``."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    total = 0.0
    for tup, prob in ordered_unique_probabilities(p, num_sampled).items():
        used, tries = 0.0, 0.0
        for a in tup:
            tries += 1.0 / (1.0 - used)
            used += p[a]
        total += prob * tries
    return total
