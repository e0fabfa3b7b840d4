"""An independent SASRec in the same run: RecBole's SASRec, trained on OUR split, scored by OUR metrics.

RecBole (https://github.com/RUCAIBox/RecBole, MIT licence) is installed beside the project, not
vendored: ``pip install -e '.[peer]' && pip install --no-deps recbole==1.2.1`` (``--no-deps``
because recbole 1.2.1 pins ``ray<=2.6.3``, which our ``ray>=2.9`` excludes; it imports ray only
in ``recbole.quick_start``, which is not used here). Two shims make it run with numpy 2 and
torch >= 2.6, neither touching the model or its training:

* ``recbole.config.Config`` sets ``np.float = np.float_`` (and ``np.complex_``, ``np.unicode_``),
  which numpy 2.0 removed (``AttributeError: np.float_ was removed in the NumPy 2.0 release``):
  :func:`numpy_aliases` defines those three old names before RecBole is imported;
* ``Trainer.evaluate(load_best_model=True)`` calls ``torch.load`` without ``weights_only=False``,
  which torch >= 2.6 refuses for RecBole's checkpoint (``UnpicklingError: Weights only load
  failed``): the best checkpoint is loaded here with ``weights_only=False`` (our own file).

How the protocol stays identical:

1. :func:`atomic_interactions` writes our ``Dataset.seq`` (our users, our internal item indices,
   each user's interactions in our order) as RecBole atomic rows whose timestamp is the rank
   within the user, so RecBole's time ordering cannot reorder ties differently from ours;
2. RecBole's own leave-one-out (``split: {LS: valid_and_test}``, ``order: TO``) then gives the
   same targets, which :func:`check_same_split` verifies against ``train/valid/test_positions``
   (targets and test histories) before training; a mismatch raises;
3. RecBole trains (its ``Trainer.fit``, early stopping on its own validation NDCG@10 of the same
   validation targets), and the best model's full-catalogue scores for our test positions go
   through :func:`trainer.metrics.evaluate` like every other row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data import Dataset, history_batch

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
INSTALL = "pip install -e '.[peer]' && pip install --no-deps recbole==1.2.1"

# RecBole's SASRec defaults (recbole/properties/model/SASRec.yaml), written out so that the
# table's config is visible here; lr and batch are RecBole's defaults too.
SASREC = {
    "n_layers": 2,
    "n_heads": 2,
    "hidden_size": 64,
    "inner_size": 256,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "learning_rate": 0.001,
    "train_batch_size": 2048,
}


@dataclass
class Atomic:
    """Interactions as RecBole atomic rows, one per position of ``Dataset.seq``.

    Attributes:
        users: int64 ``[T]`` our internal user index of each row.
        items: int64 ``[T]`` our internal item index.
        ranks: int64 ``[T]`` the row's rank within its user (0 = first), its "timestamp".
    """

    users: np.ndarray
    items: np.ndarray
    ranks: np.ndarray


def atomic_interactions(ds: Dataset) -> Atomic:
    """Our sequences as atomic rows in position order (row ``p`` is position ``p``)."""
    lengths = ds.seq.lengths()
    users = np.repeat(np.arange(ds.num_users, dtype=np.int64), lengths)
    ranks = np.arange(len(ds.seq), dtype=np.int64) - ds.seq.offsets[users]
    return Atomic(users, ds.seq.items.astype(np.int64), ranks)


def write_atomic(atomic: Atomic, path: Path) -> None:
    """RecBole's ``.inter`` file: header ``user_id:token item_id:token timestamp:float``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.stack([atomic.users, atomic.items, atomic.ranks], 1)
    header = "user_id:token\titem_id:token\ttimestamp:float"
    np.savetxt(path, rows, fmt="%d", delimiter="\t", header=header, comments="")


def positions_of(ds: Dataset, users: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """int64 positions into ``ds.seq`` of rows given by our user index and rank within user."""
    users, ranks = np.asarray(users, dtype=np.int64), np.asarray(ranks, dtype=np.int64)
    if len(users) and (ranks.min() < 0 or (ranks >= ds.seq.lengths()[users]).any()):
        raise ValueError("a rank lies outside its user's sequence; the atomic file is not ours.")
    return ds.seq.offsets[users] + ranks


def to_recbole_history(
    hist: np.ndarray, lengths: np.ndarray, recbole_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Our right-aligned, -1-padded histories as RecBole's left-aligned, 0-padded item lists.

    Args:
        hist: int64 ``[N, L]`` from ``history_batch`` (most recent item last, -1 padding left).
        lengths: int64 ``[N]`` real items per row.
        recbole_id: int64 ``[num_items]`` RecBole's id of each of our items (>= 1).

    Returns:
        ``(item_seq, item_length)``: int64 ``[N, L]`` RecBole ids, oldest first, 0-padded on
        the right; int64 ``[N]`` (= ``lengths``).
    """
    n, width = hist.shape
    shift = width - lengths  # columns of padding on the left
    cols = (np.arange(width)[None, :] + shift[:, None]) % width  # rotate padding to the right
    rolled = hist[np.arange(n)[:, None], cols]
    keep = np.arange(width)[None, :] < lengths[:, None]
    seq = np.where(keep, recbole_id[np.maximum(rolled, 0)], 0)
    return seq.astype(np.int64), lengths.astype(np.int64)


def numpy_aliases() -> None:
    """Define the numpy < 2 names RecBole 1.2.1's Config assigns from (``np.float_`` ...)."""
    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if old not in np.__dict__:
            setattr(np, old, new)


def recbole_available() -> bool:
    try:
        import recbole  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """RecBole's Trainer writes ``log_tensorboard/`` into the working directory: keep it there."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class PeerRun:
    """A trained peer: ``score_fn`` for ``trainer.metrics.evaluate``, and its costs.

    ``seconds`` is the whole ``fit`` (training and per-epoch validation), ``train_seconds`` the
    training epochs only, ``examples`` the training targets seen (epochs x targets).
    """

    score_fn: Any
    seconds: float
    train_seconds: float
    examples: int
    epochs: int


def recbole_config(workdir: Path, seed: int, epochs: int, patience: int, max_len: int, **extra):
    """RecBole's ``Config`` for SASRec on ``workdir/shardrec/shardrec.inter``."""
    numpy_aliases()
    from recbole.config import Config

    settings = {
        **SASREC,
        "data_path": str(workdir),
        "checkpoint_dir": str(workdir / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": max_len,
        "train_neg_sample_args": None,
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "metrics": ["Hit", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "epochs": epochs,
        "stopping_step": patience,
        "seed": seed,
        "reproducibility": True,
        "device": "cpu",
        "use_gpu": False,
        "show_progress": False,
        "worker": 0,
        **extra,
    }
    return Config(model="SASRec", dataset="shardrec", config_dict=settings)


def recbole_item_ids(rb_dataset, num_items: int) -> np.ndarray:
    """int64 ``[num_items]``: RecBole's id of each of our items (-1 where RecBole has none)."""
    token_id = rb_dataset.field2token_id["item_id"]
    return np.array([token_id.get(str(i), -1) for i in range(num_items)], dtype=np.int64)


def check_same_split(ds: Dataset, rb_dataset, loaders) -> None:
    """Raise unless RecBole's train/valid/test targets are exactly ours, and its test
    histories (its item lists) are exactly ours (``history_batch`` at ``ds.max_history``)."""
    users = np.array([int(t) for t in rb_dataset.field2id_token["user_id"][1:]], dtype=np.int64)
    items = np.array([int(t) for t in rb_dataset.field2id_token["item_id"][1:]], dtype=np.int64)
    users, items = np.concatenate([[-1], users]), np.concatenate([[-1], items])
    for split, loader in zip(("train", "valid", "test"), loaders):
        feat = loader._dataset.inter_feat
        pos = positions_of(ds, users[feat["user_id"].numpy()], feat["timestamp"].long().numpy())
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        ours = ds.positions(split)
        if len(pos) != len(ours) or not np.array_equal(pos, ours):
            raise ValueError(
                f"RecBole's {split} split differs from ours: {len(pos)} targets vs "
                f"{len(ours)}; the peer would not be evaluated on the same protocol."
            )
        if not np.array_equal(items[feat["item_id"].numpy()][order], ds.seq.items[pos]):
            raise ValueError(f"RecBole's {split} target items differ from ours.")
        if split == "test":
            hist, lengths = history_batch(ds.seq, pos, ds.max_history)
            seq, _ = to_recbole_history(hist, lengths, recbole_item_ids(rb_dataset, ds.num_items))
            theirs = feat["item_id_list"].numpy()[order]
            if not np.array_equal(seq, theirs) or not np.array_equal(
                feat["item_length"].numpy()[order], lengths
            ):
                raise ValueError("RecBole's test histories differ from ours.")


def train_sasrec(
    ds: Dataset, workdir: Path, seed: int, epochs: int = 200, patience: int = 10, **extra
) -> PeerRun:
    """Train RecBole's SASRec on ``ds``'s split; the best epoch (by validation NDCG@10) scores.

    Args:
        ds: our data set (the split the other rows use).
        workdir: a fresh folder for RecBole's atomic file, checkpoints and logs.
        seed: RecBole's seed.
        epochs, patience: RecBole's ``epochs`` and ``stopping_step``.
        extra: further RecBole settings (e.g. ``hidden_dropout_prob``).
    """
    if not recbole_available():
        raise ImportError(f"the SASRec peer needs RecBole {RECBOLE_VERSION}: {INSTALL}")
    workdir = Path(workdir).resolve()
    write_atomic(atomic_interactions(ds), workdir / "shardrec" / "shardrec.inter")
    cfg = recbole_config(workdir, seed, epochs, patience, ds.max_history, **extra)
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    class TimedTrainer(Trainer):
        train_seconds, epochs_run = 0.0, 0

        def _train_epoch(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._train_epoch(*args, **kwargs)
            finally:
                self.train_seconds += time.perf_counter() - start
                self.epochs_run += 1

    threads = torch.get_num_threads()  # RecBole's init_seed leaves it; keep ours
    init_seed(seed, True)
    with _cwd(workdir):
        rb_ds = create_dataset(cfg)
        loaders = data_preparation(cfg, rb_ds)
        check_same_split(ds, rb_ds, loaders)
        init_seed(seed, True)
        model = SASRec(cfg, loaders[0]._dataset)
        trainer = TimedTrainer(cfg, model)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        trainer.fit(loaders[0], loaders[1], saved=True, show_progress=False)
        seconds = time.perf_counter() - start
    state = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    logger.info("SASRec seed %d: best valid %s", seed, trainer.best_valid_result)
    return PeerRun(
        sasrec_score_fn(model, ds, recbole_item_ids(rb_ds, ds.num_items)),
        seconds,
        trainer.train_seconds,
        trainer.epochs_run * len(ds.train_positions),
        trainer.epochs_run,
    )


def sasrec_score_fn(model, ds: Dataset, recbole_id: np.ndarray):
    """``score_fn(positions) -> float [b, num_items]`` in OUR item order, from RecBole's
    ``full_sort_predict`` on the history before each position; items RecBole never saw: -inf."""
    from recbole.data.interaction import Interaction

    missing = torch.from_numpy(recbole_id < 0)
    cols = torch.from_numpy(np.maximum(recbole_id, 0))

    def score_fn(positions: np.ndarray) -> torch.Tensor:
        hist, lengths = history_batch(ds.seq, positions, ds.max_history)
        seq, length = to_recbole_history(hist, lengths, recbole_id)
        batch = Interaction(
            {model.ITEM_SEQ: torch.from_numpy(seq), model.ITEM_SEQ_LEN: torch.from_numpy(length)}
        )
        with torch.no_grad():
            scores = model.full_sort_predict(batch)[:, cols]
        return scores.masked_fill(missing, float("-inf"))

    return score_fn
