"""The in-run SASRec peer: pmixer/SASRec.pytorch's model, trained on OUR split, scored by OUR metrics.

The model is ``benchmarks/vendor/sasrec_pmixer.py`` (upstream ``python/model.py``, verbatim,
Apache-2.0). Training follows upstream ``python/main.py`` / ``python/utils.py``: one sequence
per user (every position a target, one negative per position drawn outside the user's
training items, BCE on the positive and the negative logit), Xavier-normal initialisation,
Adam (betas 0.9, 0.98), batches of 128 users, upstream's default sizes. What differs, so that
the protocol is ours: the sequences are cut from OUR ``Dataset`` (:func:`user_sequences`,
checked to hold exactly ``train_positions`` as targets), the input window is
``ds.max_history`` (upstream's default 200 is for the full ML-1M), model selection is every
``eval_every`` epochs on our validation split, and the best model's scores over all items go to
``trainer.metrics.evaluate`` (full ranking, history excluded; upstream samples 100 negatives).

Item ids: upstream reserves 0 for padding, so our item ``i`` is its ``i + 1``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.vendor.sasrec_pmixer import SASRec
from trainer import metrics
from trainer.data import Dataset, history_batch

logger = logging.getLogger(__name__)


@dataclass
class SASRecArgs:
    """Upstream's command-line defaults (python/main.py), except ``maxlen`` (ours)."""

    maxlen: int = 50
    hidden_units: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout_rate: float = 0.2
    lr: float = 0.001
    batch_size: int = 128
    l2_emb: float = 0.0
    norm_first: bool = False
    device: str = "cpu"


@dataclass
class Sequences:
    """Per-user training sequences in upstream's id space (items + 1).

    Attributes:
        users: int64 ``[U']`` our user index of each sequence (users with a training target).
        items: list of int64 arrays, the user's items up to and including its last training
            target, in our order.
        starts: int64 ``[U']`` the position in ``ds.seq`` of each sequence's first item.
    """

    users: np.ndarray
    items: list[np.ndarray]
    starts: np.ndarray

    def targets(self) -> np.ndarray:
        """int64 positions in ``ds.seq`` of every training target (each item but the first)."""
        parts = [s + np.arange(1, len(x)) for s, x in zip(self.starts, self.items)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def user_sequences(ds: Dataset) -> Sequences:
    """Each user's items from the first one to its last training target (upstream's
    ``user_train``); raises unless the targets are exactly ``ds.train_positions``."""
    train = ds.train_positions
    users = ds.seq.user_of(train)
    has = np.unique(users)
    last = np.zeros(ds.num_users, dtype=np.int64)
    np.maximum.at(last, users, train)
    starts = ds.seq.offsets[has]
    items = [ds.seq.items[s : last[u] + 1] + 1 for u, s in zip(has, starts)]
    seqs = Sequences(has.astype(np.int64), items, starts.astype(np.int64))
    if not np.array_equal(np.sort(seqs.targets()), train):
        raise ValueError(
            "the training positions of some user are not one run from its second interaction; "
            "the SASRec peer's per-user sequences would not train on our training targets."
        )
    return seqs


def sample_batch(
    items: list[np.ndarray], maxlen: int, num_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upstream's ``sample()`` for each sequence: ``(seq, pos, neg)`` int64 ``[B, maxlen]``,
    right-aligned, 0-padded; ``neg`` drawn uniformly from ``1..num_items`` outside the user's
    training items, one per position that has a target."""
    b = len(items)
    seq = np.zeros((b, maxlen), dtype=np.int64)
    pos = np.zeros((b, maxlen), dtype=np.int64)
    neg = np.zeros((b, maxlen), dtype=np.int64)
    for r, x in enumerate(items):
        k = min(len(x) - 1, maxlen)
        seq[r, maxlen - k :] = x[-k - 1 : -1]
        pos[r, maxlen - k :] = x[-k:]
        draw = rng.integers(1, num_items + 1, size=k)
        bad = np.isin(draw, x)
        while bad.any():
            draw[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
            bad = np.isin(draw, x)
        neg[r, maxlen - k :] = draw
    return seq, pos, neg


def init_like_upstream(model: SASRec) -> None:
    """Xavier-normal on every parameter that has one (upstream's try/except), padding rows 0."""
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.xavier_normal_(p.data)
    model.pos_emb.weight.data[0, :] = 0
    model.item_emb.weight.data[0, :] = 0


def score_function(model: SASRec, ds: Dataset, maxlen: int):
    """``score_fn(positions) -> float [b, num_items]`` (our item order) from upstream's
    ``predict`` over all items, on the history before each position."""
    all_items = np.arange(1, ds.num_items + 1)

    def score_fn(positions: np.ndarray) -> torch.Tensor:
        hist, _ = history_batch(ds.seq, positions, maxlen)
        with torch.no_grad():
            return model.predict(None, hist + 1, all_items)

    return score_fn


@dataclass
class PeerRun:
    """The best model's ``score_fn`` and its costs (``seconds``: the whole fit with
    validation; ``train_seconds``: training steps only; ``examples``: targets trained on)."""

    score_fn: object
    seconds: float
    train_seconds: float
    examples: int
    epochs: int
    best_epoch: int


def train_sasrec(
    ds: Dataset,
    seed: int,
    epochs: int = 200,
    eval_every: int = 5,
    patience: int = 5,
    args: SASRecArgs | None = None,
) -> PeerRun:
    """Train upstream's SASRec on our training split; keep the best of the validations.

    Args:
        ds: our data set.
        seed: seeds torch (init, dropout) and the negative sampler.
        epochs: at most this many epochs.
        eval_every: validate (our full-ranking NDCG@10 on ``valid``) every this many epochs.
        patience: stop after this many validations without improvement.
        args: model and optimiser settings (upstream's defaults, ``maxlen = ds.max_history``).
    """
    args = args or SASRecArgs(maxlen=ds.max_history)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seqs = user_sequences(ds)
    per_epoch = sum(len(x) - 1 for x in seqs.items)
    model = SASRec(ds.num_users, ds.num_items, args)
    init_like_upstream(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    bce = torch.nn.BCEWithLogitsLoss()
    best, best_state, best_epoch, bad, epoch = -1.0, None, 0, 0, 0
    train_seconds, start = 0.0, time.perf_counter()
    while epoch < epochs and bad < patience:
        model.train()
        t0 = time.perf_counter()
        order = rng.permutation(len(seqs.items))
        for lo in range(0, len(order), args.batch_size):
            batch = [seqs.items[i] for i in order[lo : lo + args.batch_size]]
            seq, pos, neg = sample_batch(batch, args.maxlen, ds.num_items, rng)
            pos_logits, neg_logits = model(None, seq, pos, neg)
            idx = np.where(pos != 0)
            loss = bce(pos_logits[idx], torch.ones_like(pos_logits[idx]))
            loss = loss + bce(neg_logits[idx], torch.zeros_like(neg_logits[idx]))
            if args.l2_emb:  # upstream's embedding L2 (0 by default: nothing to add)
                for p in model.item_emb.parameters():
                    loss = loss + args.l2_emb * torch.sum(p**2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_seconds += time.perf_counter() - t0
        epoch += 1
        if epoch % eval_every and epoch < epochs:
            continue
        model.eval()
        score = metrics.evaluate(ds, score_function(model, ds, args.maxlen), "valid", ks=(10,))
        ndcg = score["filtered"]["NDCG@10"]
        logger.info("SASRec epoch %d: loss %.4f, valid NDCG@10 %.4f", epoch, loss.item(), ndcg)
        if ndcg > best:
            best, best_state, best_epoch, bad = ndcg, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            bad += 1
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    return PeerRun(
        score_function(model, ds, args.maxlen),
        seconds,
        train_seconds,
        epoch * per_epoch,
        epoch,
        best_epoch,
    )
