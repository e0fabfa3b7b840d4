"""Full-ranking evaluation of next-item prediction: HR@K, NDCG@K and MRR over the catalogue.

The rank of a target is the number of items that score strictly higher than it, not counting
excluded items; the target itself never counts (ties are in the target's favour). From a rank
``r`` (0-based): ``HR@K = [r < K]``, ``NDCG@K = 1 / log2(r + 2)`` if ``r < K`` else 0, and
``MRR = 1 / (r + 1)``; every metric is the mean over rows.

*Filtered* evaluation excludes, per row, every item the user interacted with before the target
(the target stays rankable even when it is a repeat); *unfiltered* excludes nothing.
``evaluate`` returns both from one pass of scoring.

Scores come in chunks of rows from a ``score_fn``, so catalogues of millions of items need only
``batch_size x num_items`` scores in memory at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from trainer.data import Dataset, ItemSets, history_sets

logger = logging.getLogger(__name__)

Exclusions = ItemSets | tuple | Sequence | np.ndarray | torch.Tensor | None
ScoreFn = Callable[[np.ndarray], torch.Tensor]
Ties = Literal["optimistic", "pessimistic"]


def _as_long(x: object, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(x, dtype=np.int64), device=device)


def _exclusion_pairs(
    exclude: Exclusions, n: int, num_items: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, items)`` int64 index pairs of the excluded entries; padding (-1) dropped."""
    if exclude is None:
        return None
    if isinstance(exclude, ItemSets) or (
        isinstance(exclude, tuple) and len(exclude) == 2 and len(exclude[0]) == n + 1
    ):
        offsets = np.asarray(exclude[0], dtype=np.int64)
        items = np.asarray(exclude[1], dtype=np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        items = items[offsets[0] : offsets[-1]]
    elif isinstance(exclude, np.ndarray | torch.Tensor) and exclude.ndim == 2:
        if exclude.shape[0] != n:
            raise ValueError(f"exclude has {exclude.shape[0]} rows, expected one per target ({n}).")
        mat = exclude.cpu().numpy() if isinstance(exclude, torch.Tensor) else exclude
        rows = np.repeat(np.arange(n, dtype=np.int64), mat.shape[1])
        items = np.asarray(mat, dtype=np.int64).reshape(-1)
    else:
        if len(exclude) != n:
            raise ValueError(
                f"exclude has {len(exclude)} rows, expected one per target ({n}); pass a list "
                f"of item arrays, an ItemSets (offsets, items), a padded [N, L] array, or None."
            )
        parts = [np.asarray(r, dtype=np.int64).reshape(-1) for r in exclude]
        rows = np.repeat(np.arange(n, dtype=np.int64), [len(p) for p in parts])
        items = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    keep = items >= 0
    rows, items = rows[keep], items[keep]
    if len(items) and items.max() >= num_items:
        raise ValueError(
            f"exclude holds item {int(items.max())}, but scores cover only {num_items} items; "
            f"exclusions must be internal item indices (-1 for padding)."
        )
    return torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device)


def rank_of_targets(
    scores: torch.Tensor,
    targets: torch.Tensor | np.ndarray | Sequence[int],
    exclude: Exclusions = None,
    ties: Ties = "optimistic",
) -> torch.Tensor:
    """0-based rank of each target among the non-excluded items.

    Args:
        scores: float ``[N, num_items]``.
        targets: int ``[N]`` internal item indices.
        exclude: items not to count, per row: a list of ``N`` int arrays, an ``ItemSets`` /
            ``(offsets [N+1], items)`` CSR tuple, an int ``[N, L]`` array padded with -1, or
            None. Repeats are counted once. The target is never excluded (it could not be: it
            never counts against itself).
        ties: ``"optimistic"`` (default) counts items scoring strictly higher;
            ``"pessimistic"`` also counts other items with a score equal to the target's.

    Returns:
        int64 ``[N]`` on ``scores.device``.
    """
    (ranks,) = _ranks(scores, targets, (exclude,), ties)
    return ranks


def _ranks(
    scores: torch.Tensor,
    targets: torch.Tensor | np.ndarray | Sequence[int],
    exclusions: Sequence[Exclusions],
    ties: Ties,
) -> list[torch.Tensor]:
    """``rank_of_targets`` for several exclusion specs, comparing the scores only once."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(
            f"scores must be a 2-D tensor [N, num_items], got "
            f"{type(scores).__name__} of shape {tuple(getattr(scores, 'shape', ()))}."
        )
    n, num_items = scores.shape
    tgt = _as_long(targets, scores.device).reshape(-1)
    if tgt.numel() != n:
        raise ValueError(f"targets must have one entry per row of scores ({n}), got {tgt.numel()}.")
    if ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}.")
    if n == 0:
        return [torch.zeros(0, dtype=torch.long, device=scores.device) for _ in exclusions]
    lo, hi = int(tgt.min()), int(tgt.max())
    if lo < 0 or hi >= num_items:
        raise ValueError(
            f"targets must be internal item indices in [0, {num_items}), got values in "
            f"[{lo}, {hi}]; map original ids with dataset.items.lookup and drop -1 (unknown)."
        )
    rows = torch.arange(n, device=scores.device)
    target_scores = scores.gather(1, tgt[:, None])  # [N, 1]
    if torch.isnan(target_scores).any():
        bad = int(torch.isnan(target_scores).reshape(-1).nonzero()[0])
        raise ValueError(
            f"the target's score is NaN in row {bad}; a NaN would rank first. Check the model "
            f"for NaN outputs."
        )
    above = scores > target_scores if ties == "optimistic" else scores >= target_scores
    above[rows, tgt] = False  # [N, num_items] bool
    if above.device.type == "cpu":  # torch's bool reductions are slow on CPU; numpy's are not
        counts = torch.from_numpy(np.count_nonzero(above.numpy(), axis=1).astype(np.int64))
    else:
        counts = above.sum(dim=1)
    out = []
    for exclude in exclusions:
        pairs = _exclusion_pairs(exclude, n, num_items, scores.device)
        if pairs is None or not pairs[0].numel():
            out.append(counts.clone())
            continue
        keys = torch.unique(pairs[0] * num_items + pairs[1])  # each (row, item) once
        hit = above.reshape(-1)[keys]
        out.append(counts - torch.bincount(keys[hit] // num_items, minlength=n))
    return out


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``{"HR@K", "NDCG@K" for K in ks, "MRR"}``, means over the ranks (0-based)."""
    r = torch.as_tensor(ranks).detach().cpu().to(torch.float64)
    if r.numel() == 0:
        raise ValueError("no ranks to average: the evaluation has no rows.")
    out: dict[str, float] = {}
    gain = 1.0 / torch.log2(r + 2.0)
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, gain, torch.zeros_like(gain)).mean())
    out["MRR"] = float((1.0 / (r + 1.0)).mean())
    return out


def _normalize(exclude: Exclusions, n: int) -> Exclusions:
    """A CSR ``(offsets, items)`` tuple becomes ``ItemSets``; other forms pass through."""
    if isinstance(exclude, tuple) and not isinstance(exclude, ItemSets) and len(exclude) == 2:
        offsets = np.asarray(exclude[0])
        if offsets.ndim == 1 and offsets.dtype.kind in "iu" and len(offsets) == n + 1:
            return ItemSets(offsets.astype(np.int64), np.asarray(exclude[1], dtype=np.int64))
    return exclude


def _slice(exclude: Exclusions, start: int, stop: int) -> Exclusions:
    if exclude is None:
        return None
    if isinstance(exclude, ItemSets):
        return exclude.rows(start, stop)
    return exclude[start:stop]


def auto_batch_size(num_items: int, budget: int = 1 << 25) -> int:
    """Rows per chunk so that a chunk of scores holds about ``budget`` entries (<= 4096)."""
    return int(max(1, min(4096, budget // max(num_items, 1))))


def full_ranking_ranks(
    score_fn: ScoreFn,
    targets: np.ndarray | torch.Tensor | Sequence[int],
    exclusions: Sequence[Exclusions] = (None,),
    *,
    batch_size: int | None = None,
    ties: Ties = "optimistic",
    progress: bool | None = None,
    desc: str = "evaluate",
) -> list[torch.Tensor]:
    """Ranks of ``targets`` under each exclusion set in ``exclusions``, scoring once per chunk.

    Args:
        score_fn: ``score_fn(rows: int64 np.ndarray [b]) -> float Tensor [b, num_items]``;
            ``rows`` index ``targets`` (0..N-1).
        targets: int ``[N]`` internal item indices.
        exclusions: one exclusion spec per wanted ranking (see ``rank_of_targets``), each
            covering all N rows.
        batch_size: rows per chunk; None picks one from the catalogue size (~32M scores).
        progress: tqdm bar; None shows it only on a terminal.

    Returns:
        one int64 CPU tensor ``[N]`` per entry of ``exclusions``.
    """
    tgt = np.asarray(
        targets.cpu().numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64
    ).reshape(-1)
    n = len(tgt)
    if n == 0:
        raise ValueError("targets is empty; expected at least one row to evaluate.")
    exclusions = [_normalize(ex, n) for ex in exclusions]
    out: list[list[torch.Tensor]] = [[] for _ in exclusions]
    bar = tqdm(total=n, desc=desc, unit="row", disable=None if progress is None else not progress)
    step = batch_size
    with bar, torch.no_grad():
        start = 0
        while start < n:
            stop = min(n, start + (step or 1))
            rows = np.arange(start, stop, dtype=np.int64)
            scores = score_fn(rows)
            if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or len(scores) != len(rows):
                raise ValueError(
                    f"score_fn must return a float tensor [{len(rows)}, num_items] for "
                    f"{len(rows)} rows, got {type(scores).__name__} of shape "
                    f"{tuple(getattr(scores, 'shape', ()))}; expand a shared score vector with "
                    f".expand(len(rows), -1)."
                )
            if step is None:  # first chunk was 1 row: now size chunks by the catalogue
                step = auto_batch_size(scores.shape[1])
            chunk = [_slice(ex, start, stop) for ex in exclusions]
            for j, r in enumerate(_ranks(scores, tgt[start:stop], chunk, ties)):
                out[j].append(r.cpu())
            bar.update(stop - start)
            start = stop
    return [torch.cat(parts) for parts in out]


def evaluate_full_ranking(
    score_fn: ScoreFn,
    targets: np.ndarray | torch.Tensor | Sequence[int],
    exclusions: Exclusions = None,
    ks: Sequence[int] = (10, 50, 100),
    batch_size: int | None = None,
    *,
    ties: Ties = "optimistic",
    progress: bool | None = None,
) -> dict[str, float]:
    """HR@K, NDCG@K (for K in ``ks``) and MRR of ``targets`` over the full catalogue.

    Args:
        score_fn: ``score_fn(rows: int64 np.ndarray [b]) -> Tensor [b, num_items]``, called on
            consecutive chunks of ``0..N-1`` (rows of ``targets``).
        targets: int ``[N]`` internal item indices.
        exclusions: items to exclude per row (filtered evaluation) or None (unfiltered); see
            ``rank_of_targets`` for the accepted forms.
        ks: cut-offs.
        batch_size: rows per chunk (None: about 32M scores per chunk).
        progress: tqdm bar; None shows it only on a terminal.
    """
    (ranks,) = full_ranking_ranks(
        score_fn, targets, (exclusions,), batch_size=batch_size, ties=ties, progress=progress
    )
    return metrics_from_ranks(ranks, ks)


def popularity_scores(dataset: Dataset) -> torch.Tensor:
    """float32 ``[num_items]``: each item's training popularity (the most-popular baseline)."""
    return torch.from_numpy(dataset.items.popularity.astype(np.float32))


def evaluate(
    dataset: Dataset,
    score_fn: ScoreFn,
    split: Literal["valid", "test"] = "test",
    ks: Sequence[int] = (10, 50, 100),
    batch_size: int | None = None,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    ties: Ties = "optimistic",
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Filtered and unfiltered full-ranking metrics on a split of ``dataset``.

    Args:
        dataset: the data set.
        score_fn: ``score_fn(positions: int64 np.ndarray [b]) -> Tensor [b, num_items]``.
            NOTE: it gets the *target positions* into ``dataset.seq`` (not row numbers), so it
            can build inputs with ``history_batch(dataset.seq, positions, max_len)`` and
            ``dataset.seq.user_of(positions)``; it must not look at the targets.
        split: ``"valid"`` or ``"test"`` (``"train"`` works too).
        ks: cut-offs.
        batch_size: positions per chunk (None: about 32M scores per chunk).
        max_examples: evaluate a random subset of this many positions (seeded by ``seed``).
        ties, progress: see ``full_ranking_ranks``.

    Returns:
        ``{"filtered": metrics, "unfiltered": metrics}`` where metrics are ``{"HR@K", "NDCG@K", "MRR"}``; filtered excludes every item the user
        interacted with before the target (except the target itself).
    """
    positions = dataset.positions(split)
    if max_examples is not None and max_examples < len(positions):
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(positions, size=max_examples, replace=False))
    if len(positions) == 0:
        raise ValueError(
            f"split {split!r} of {dataset.name} has no examples (users with 2 interactions "
            f"have no validation example); evaluate on 'test' instead."
        )
    targets = dataset.seq.items[positions]
    history = history_sets(dataset.seq, positions)

    def rows_to_positions(rows: np.ndarray) -> torch.Tensor:
        return score_fn(positions[rows])

    filtered, unfiltered = full_ranking_ranks(
        rows_to_positions,
        targets,
        (history, None),
        batch_size=batch_size,
        ties=ties,
        progress=progress,
        desc=f"evaluate {split}",
    )
    result = {
        "filtered": metrics_from_ranks(filtered, ks),
        "unfiltered": metrics_from_ranks(unfiltered, ks),
    }
    logger.info(
        "%s %s (%d examples): filtered %s | unfiltered %s",
        dataset.name,
        split,
        len(positions),
        _fmt(result["filtered"]),
        _fmt(result["unfiltered"]),
    )
    return result


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items() if not math.isnan(v))


def popularity_score_fn(dataset: Dataset) -> ScoreFn:
    """A ``score_fn`` for ``evaluate``/``evaluate_full_ranking`` scoring by training popularity."""
    pop = popularity_scores(dataset)

    def score(rows: np.ndarray) -> torch.Tensor:
        return pop.expand(len(rows), -1)

    return score
