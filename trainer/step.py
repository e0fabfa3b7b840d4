"""One training step: a batch of examples, its negatives, and pull-forward-backward-push.

:func:`train_step` is the whole arithmetic of a step; the in-process trainer runs it over a
:class:`~trainer.embeddings.LocalStore`, each Ray worker over a
:class:`~trainer.shards.client.ShardedStore` (``pull(ids)`` / ``push(ids, grads, step)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

import sampler
from trainer.config import LossConfig, TrainConfig
from trainer.data import Dataset, history_batch
from trainer.model import SECONDS_PER_DAY, UserTower
from trainer.sequence import SequenceTower


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device=auto or cpu.")
    return torch.device(name)


@dataclass
class Batch:
    """One batch of examples (CPU tensors).

    history: int64 ``[B, L]`` global item ids, -1 padded on the left; targets: int64 ``[B]``;
    user_features: name -> int64 ``[B]``; age_days: float32 ``[B]``.

    A batch of target windows (the sequence tower, :func:`make_window_batch`) has
    ``target_mask``, bool ``[B, L]``: True where the tower's output at that history column is
    trained on the next item; ``targets`` is then int64 ``[N]``, ``N = target_mask.sum()``, in
    the mask's row-major order.
    """

    history: torch.Tensor
    targets: torch.Tensor
    user_features: dict[str, torch.Tensor]
    age_days: torch.Tensor
    target_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.targets.numel()


def make_batch(ds: Dataset, positions: np.ndarray, with_age: bool = True) -> Batch:
    """The examples whose targets sit at ``positions`` of ``ds.seq``."""
    hist, _ = history_batch(ds.seq, positions, ds.max_history)
    users = ds.seq.user_of(positions)
    feats = {k: torch.from_numpy(np.asarray(v)[users]) for k, v in ds.user_features.items()}
    if with_age:
        age = (ds.t_max - ds.seq.timestamps[positions]).clip(min=0) / SECONDS_PER_DAY
    else:
        age = np.zeros(len(positions))
    return Batch(
        torch.from_numpy(np.asarray(hist)).long(),
        torch.from_numpy(ds.seq.items[positions]).long(),
        feats,
        torch.from_numpy(np.asarray(age, dtype=np.float32)),
    )


def make_window_batch(ds: Dataset, ends: np.ndarray, counts: np.ndarray) -> Batch:
    """The target windows ending at ``ends`` with ``counts`` targets each
    (:func:`trainer.data.target_windows`): one history row per window, every target trained.

    Row ``w`` is the ``L`` items before ``ends[w]`` (right-aligned, -1 on the left); the output
    at column ``j`` predicts the item after column ``j``, so the last ``counts[w]`` columns are
    the targets ``ends[w] - counts[w] + 1 .. ends[w]``.
    """
    length = ds.max_history
    counts = np.asarray(counts, dtype=np.int64)
    mask = np.arange(length)[None, :] >= (length - counts)[:, None]  # [W, L]
    cols = np.nonzero(mask)
    target_pos = np.asarray(ends)[cols[0]] - (length - 1 - cols[1])
    windows = make_batch(ds, ends, with_age=False)  # histories and user features of the rows
    return replace(
        windows,
        targets=torch.from_numpy(ds.seq.items[target_pos]).long(),
        target_mask=torch.from_numpy(mask),
    )


class Negatives:
    """Draws the candidates of a step as the loss config asks (None for the full softmax).

    ``sampled``: the configured sampler (unique, TensorFlow's semantics). ``in_batch``: the
    batch's targets, with expected counts ``B * p(item)`` from training popularity (logQ
    correction). ``mixed``: both, expected counts added.
    """

    def __init__(self, cfg: LossConfig, num_items: int, popularity: np.ndarray) -> None:
        self.cfg = cfg
        self.num_items = num_items
        pop = torch.as_tensor(popularity, dtype=torch.float64) + 1.0
        self.unigram = (pop / pop.sum()).float()
        if cfg.kind == "sampled" and cfg.negatives != "in_batch" and cfg.num_sampled > num_items:
            raise ValueError(
                f"loss.num_sampled ({cfg.num_sampled}) must be <= the number of items "
                f"({num_items}); lower it."
            )
        if cfg.sampler == "log_uniform":
            self.sampler: sampler.RangeSampler = sampler.LogUniformSampler(num_items)
        elif cfg.sampler == "uniform":
            self.sampler = sampler.UniformSampler(num_items)
        else:
            weights = (pop.float() ** cfg.unigram_distortion).tolist()
            self.sampler = sampler.FixedUnigramSampler(num_items, unigrams=weights)

    def __call__(self, targets: torch.Tensor, gen: torch.Generator) -> sampler.SampledValues | None:
        if self.cfg.kind == "full":
            return None
        labels = targets.unsqueeze(1)
        if self.cfg.negatives in ("sampled", "mixed"):
            sv = self.sampler.sample(labels, 1, self.cfg.num_sampled, True, seed=gen)
            if self.cfg.negatives == "sampled":
                return sv
        batch = targets.numel()
        q = self.unigram.to(targets.device)
        in_batch = sampler.SampledValues(targets, batch * q[labels], batch * q[targets])
        if self.cfg.negatives == "in_batch":
            return in_batch
        return sampler.SampledValues(
            torch.cat([sv.sampled_candidates, in_batch.sampled_candidates]),
            sv.true_expected_count + in_batch.true_expected_count,
            torch.cat([sv.sampled_expected_count, in_batch.sampled_expected_count]),
        )


def step_ids(batch: Batch, negatives: sampler.SampledValues | None, num_items: int):
    """Unique item ids a step touches, per table use: ``(all_ids, input_ids, output_ids)``."""
    hist = batch.history[batch.history >= 0]
    if negatives is None:
        out = torch.arange(num_items)
    else:
        out = torch.unique(torch.cat([batch.targets, negatives.sampled_candidates]))
    inp = torch.unique(hist)
    return torch.unique(torch.cat([inp, out])), inp, out


def train_step(
    tower: UserTower | SequenceTower,
    dense_opt: torch.optim.Optimizer,
    store,
    batch: Batch,
    negatives: sampler.SampledValues | None,
    cfg: TrainConfig,
    num_items: int,
    step: int,
    device: torch.device,
) -> float:
    """Pull rows, forward, backward, step the tower, push row gradients. Returns the loss.

    ``store`` has ``pull(ids) -> {table: rows}`` and ``push(ids_by_table, grads, step)``.
    """
    all_ids, in_ids, out_ids = step_ids(batch, negatives, num_items)
    rows = store.pull(all_ids)  # pinned when the store feeds a GPU: the copies are async
    leaves = {n: r.to(device, non_blocking=True).requires_grad_() for n, r in rows.items()}
    local = lambda ids: torch.searchsorted(all_ids, ids.cpu()).to(device)  # noqa: E731
    hist = batch.history.to(device)
    hist_local = torch.where(hist >= 0, local(batch.history.clamp(min=0)), 0)
    in_table = leaves["input"] if "input" in leaves else leaves["output"]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.bf16
        else contextlib.nullcontext()
    )
    feats = {k: v.to(device) for k, v in batch.user_features.items()}
    with autocast:
        if batch.target_mask is None:
            user = tower(in_table[hist_local], hist, feats, batch.age_days.to(device))
        else:  # every target of every window, one forward per window: [N, D]
            out = tower(in_table[hist_local], hist, feats, None, all_positions=True)
            user = out[batch.target_mask.to(device)]
    user = user.float()
    targets = local(batch.targets)
    if negatives is None:
        logits = torch.addmm(leaves["bias"], user, leaves["output"].t())
        loss = F.cross_entropy(logits, targets)
    else:
        sampled = local(negatives.sampled_candidates)
        with sampler.unchecked():
            loss = sampler.sampled_softmax_loss(
                leaves["output"],
                leaves["bias"],
                targets,
                user,
                sampled.numel(),
                all_ids.numel(),
                sampled_values=(
                    sampled,
                    negatives.true_expected_count.to(device),
                    negatives.sampled_expected_count.to(device),
                ),
                remove_accidental_hits=cfg.loss.remove_accidental_hits,
            ).mean()
    dense_opt.zero_grad(set_to_none=True)
    loss.backward()
    grads, ids = {}, {}
    for name, leaf in leaves.items():
        used = in_ids if name == "input" else out_ids
        if name == "output" and "input" not in leaves:
            used = all_ids  # tied: the output table also served the history
        sel = torch.searchsorted(all_ids, used)
        ids[name] = used
        grads[name] = leaf.grad[sel.to(device)].detach().cpu()
    store.push(ids, grads, step)  # first, so the dense step overlaps the push's round trip
    dense_opt.step()
    return loss.detach().item()
