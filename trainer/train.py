"""Single-process training of the YouTube-DNN candidate generator.

The loop (:meth:`Trainer.fit`) reads top to bottom: for each epoch, shuffle the training
positions, and for each batch run :func:`trainer.step.train_step` (pull the item rows it needs
from the store, compute the sampled softmax loss, step the dense optimizer and push the row
gradients); validate after the epoch,
keep the best model, stop early, checkpoint (:class:`~trainer.run_state.RunState`). The Ray
trainer (:mod:`trainer.distributed.worker`) is a :class:`Trainer` over a sharded store.
:func:`train_local` is the in-process backend of :func:`trainer.pipeline.run_training`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import sampler
from trainer import metrics
from trainer.config import TrainConfig
from trainer.data import Dataset, load_dataset, target_windows
from trainer.embeddings import LocalStore
from trainer.model import UserEncoder, UserTower
from trainer.run_state import BEST, CHECKPOINT, RunState, WorkerState
from trainer.sequence import SequenceTower, build_user_tower
from trainer.step import (
    Batch,
    Negatives,
    make_batch,
    make_window_batch,
    resolve_device,
    train_step,
)

logger = logging.getLogger(__name__)


def build_tower(cfg: TrainConfig, ds: Dataset) -> UserTower | SequenceTower:
    """A freshly initialised user tower shaped by ``cfg.model`` and the data's vocabularies."""
    sizes = {k: len(v) for k, v in ds.user_feature_vocab.items()}
    feats = ds.items.features
    return build_user_tower(
        cfg.model,
        sizes,
        None if feats is None else torch.as_tensor(feats),
        len(ds.items.feature_vocab or []),
        max_history=cfg.data.max_history,
    )


def user_encoder(tower: UserTower, tables: dict[str, torch.Tensor], ds: Dataset) -> UserEncoder:
    """A user encoder over ``tables``' history table (``input``; ``output`` when tied)."""
    inp = tables["input"] if "input" in tables else tables["output"]
    return UserEncoder(tower, inp, ds.max_history)


class Trainer:
    """In-process trainer: holds the data, the tower, the item store and the run state.

    Args:
        cfg: the validated config.
        dataset: the loaded data (``load_dataset(cfg.data)`` when None).
        store: an embedding store; a :class:`LocalStore` when None.
    """

    rank, world_size = 0, 1  # this trainer among the run's workers

    def __init__(self, cfg: TrainConfig, dataset: Dataset | None = None, store=None) -> None:
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.ds = dataset if dataset is not None else load_dataset(cfg.data)
        self.device = resolve_device(cfg.device)
        self.num_items = self.ds.num_items
        self.tower = build_tower(cfg, self.ds).to(self.device)
        self.dense_opt = torch.optim.Adam(
            self.tower.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.store = (
            store
            if store is not None
            else LocalStore(self.num_items, cfg.model, cfg.optim, cfg.seed)
        )
        self.negatives = Negatives(cfg.loss, self.num_items, self.ds.items.popularity)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # The units an epoch shuffles and batches: target positions (mean tower), or target
        # windows by their last position, ``window_counts`` targets each (sequence tower).
        if cfg.model.tower == "sequence":
            per_window = min(
                cfg.model.sequence.window_targets or cfg.data.max_history, cfg.data.max_history
            )
            self.units, self.window_counts = target_windows(
                self.ds.seq, self.ds.train_positions, per_window
            )
        else:
            self.units, self.window_counts = self.ds.train_positions, None
        self.has_validation = len(self.ds.valid_positions) > 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best: float = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.curves: list[dict] = []
        self.out_dir = Path(cfg.out_dir)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until ``epochs`` or early stopping; returns the per-epoch curves."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.global_step == 0:
            # A fresh run: a best model left by an earlier run in this folder is not ours.
            (self.out_dir / BEST).unlink(missing_ok=True)
        (self.out_dir / "config.json").write_text(self.cfg.to_json())
        logger.info("training %s on %s: %s", self.cfg.name, self.device, self.ds.summary())
        while self.epoch < self.cfg.epochs and self.bad_epochs < self.cfg.patience:
            start = time.perf_counter()
            train_loss = self.train_epoch()
            valid = self.validate()
            self.end_epoch(train_loss, valid, time.perf_counter() - start)
        if self.has_validation:
            logger.info(
                "best %s %.4f at epoch %d", self.cfg.monitor, self.best, self.best_epoch + 1
            )
        else:
            logger.info("trained %d epochs on every interaction (no validation)", self.epoch)
        return self.curves

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training units of ``epoch`` (positions or window ends), shuffled (seeded)."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        return self.units[rng.permutation(len(self.units))]

    def examples_in(self, units: np.ndarray) -> int:
        """How many training examples (targets) the ``units`` of an epoch order hold."""
        if self.window_counts is None:
            return len(units)
        return int(self.window_counts[np.searchsorted(self.units, units)].sum())

    def train_epoch(self) -> float:
        """One pass over the training examples (from ``batch_in_epoch`` when resuming)."""
        order = self.epoch_order(self.epoch)
        bs = self.cfg.batch_size
        n_batches = math.ceil(len(order) / bs)
        self.tower.train()
        losses, seen, start = [], 0, time.perf_counter()
        bar = tqdm(
            total=n_batches,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not self.cfg.progress,
            leave=False,
        )
        with bar:
            while self.batch_in_epoch < n_batches:
                b = self.batch_in_epoch
                positions = order[b * bs : (b + 1) * bs]
                loss = self.train_batch(positions)
                losses.append(loss)
                seen += self.examples_in(positions)
                self.batch_in_epoch += 1
                rate = seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}")
                bar.update()
                every = self.cfg.checkpoint_every
                if every and self.global_step % every == 0:
                    self.save_checkpoint()
        return float(np.mean(losses)) if losses else float("nan")

    def train_batch(self, positions: np.ndarray) -> float:
        """One training step on the units ``positions`` of an epoch order; the loss."""
        return self.train_on(*self.draw_batch(positions))

    def draw_batch(self, positions: np.ndarray) -> tuple[Batch, sampler.SampledValues | None]:
        """The batch of the units at ``positions`` (target positions, or window ends for the
        sequence tower) and its negatives (drawn from ``gen``, shared by all its targets)."""
        if self.window_counts is None:
            batch = make_batch(self.ds, positions)
        else:
            counts = self.window_counts[np.searchsorted(self.units, positions)]
            batch = make_window_batch(self.ds, positions, counts)
        return batch, self.negatives(batch.targets, self.gen)

    def train_on(self, batch: Batch, negatives: sampler.SampledValues | None) -> float:
        """The next global step on a drawn batch (see :func:`train_step`); the loss."""
        self.global_step += 1
        return train_step(
            self.tower,
            self.dense_opt,
            self.store,
            batch,
            negatives,
            self.cfg,
            self.num_items,
            self.global_step,
            self.device,
        )

    def end_epoch(self, train_loss: float, valid: dict[str, float], seconds: float) -> None:
        """Record the epoch; keep the best model (the latest one without a validation split)."""
        self.curves.append(
            {"epoch": self.epoch + 1, "train_loss": train_loss, "seconds": seconds, **valid}
        )
        if not valid:
            logger.info(
                "epoch %d: loss %.4f, no validation (data.holdout=%s) (%.1fs)",
                self.epoch + 1,
                train_loss,
                self.cfg.data.holdout,
                seconds,
            )
            self.epoch += 1
            self.batch_in_epoch = 0
            self.best_epoch, self.bad_epochs = self.epoch - 1, 0
            self.run_state("best").save(self.out_dir / BEST)
            self.save_checkpoint()
            return
        score = valid[self.cfg.monitor]
        logger.info(
            "epoch %d: loss %.4f, valid %s %.4f (%.1fs)",
            self.epoch + 1,
            train_loss,
            self.cfg.monitor,
            score,
            seconds,
        )
        self.epoch += 1
        self.batch_in_epoch = 0
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, self.epoch - 1, 0
            self.run_state("best").save(self.out_dir / BEST)
        else:
            self.bad_epochs += 1
        self.save_checkpoint()

    # --- evaluation -------------------------------------------------------------------------
    def encoder(self) -> tuple[UserEncoder, dict[str, torch.Tensor]]:
        """A CPU user encoder over the current tables, and the full tables."""
        tables = self.store.full_tables()
        tower = build_tower(self.cfg, self.ds)
        tower.load_state_dict({k: v.cpu() for k, v in self.tower.state_dict().items()})
        return user_encoder(tower, tables, self.ds), tables

    def validate(self) -> dict[str, float]:
        """Filtered validation metrics (full ranking) on the validation split; ``{}`` when the
        data hold out no validation split (``data.holdout=none``)."""
        if not self.has_validation:
            return {}
        enc, tables = self.encoder()
        result = evaluate_model(
            self.ds,
            enc,
            tables,
            "valid",
            self.cfg.eval_ks,
            self.cfg.eval_users,
            self.cfg.seed,
            self.cfg.progress,
        )
        return result["filtered"]

    # --- state ------------------------------------------------------------------------------
    def run_state(self, tag: str = "ckpt") -> RunState:
        """The state of the run now; the store saves its part under ``tag`` (ckpt, best)."""
        return RunState(
            config=self.cfg,
            tower={k: v.cpu() for k, v in self.tower.state_dict().items()},
            store=self.store_state(tag),
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            global_step=self.global_step,
            best=self.best,
            best_epoch=self.best_epoch,
            bad_epochs=self.bad_epochs,
            curves=list(self.curves),
            dense_opt=self.dense_opt.state_dict(),
            workers=self.worker_states(),
        )

    def store_state(self, tag: str) -> dict:
        """The item store's part of a :class:`RunState` (in process: the tables)."""
        return self.store.state_dict()

    def worker_states(self) -> list[WorkerState]:
        """Every worker's random state, by rank (here: this process's)."""
        return [WorkerState(self.gen.get_state(), torch.get_rng_state())]

    def save_checkpoint(self) -> Path:
        """Everything needed to resume exactly, written atomically to ``checkpoint.pt``."""
        path = self.run_state().save(self.out_dir / CHECKPOINT)
        logger.info(
            "checkpoint at step %d (epoch %d, batch %d)",
            self.global_step,
            self.epoch + 1,
            self.batch_in_epoch,
        )
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (same model and data
        config, same number of workers)."""
        path = Path(path) if path else self.out_dir / CHECKPOINT
        state = RunState.load(path)
        state.check_resumable(self.cfg, self.world_size, path)
        self.restore(state)
        logger.info(
            "resumed from %s at epoch %d, batch %d (step %d)",
            path,
            self.epoch + 1,
            self.batch_in_epoch,
            self.global_step,
        )

    def restore(self, state: RunState) -> None:
        """Take over ``state``: tower, store, optimizer, position, this worker's random state."""
        self.restore_store(state)
        self.tower.load_state_dict(state.tower)
        self.dense_opt.load_state_dict(state.dense_opt)
        mine = state.workers[self.rank]
        self.gen.set_state(mine.gen)
        torch.set_rng_state(mine.torch_rng)
        self.epoch = state.epoch
        self.batch_in_epoch = state.batch_in_epoch
        self.global_step = state.global_step
        self.best, self.best_epoch = state.best, state.best_epoch
        self.bad_epochs = state.bad_epochs
        self.curves = list(state.curves)

    def restore_store(self, state: RunState) -> None:
        """Put the item store back to ``state.store`` (in process: load the tables)."""
        self.store.load_state_dict(state.store)

    def load_best(self) -> None:
        """Load the best model (by the monitored validation metric) into the tower and store."""
        path = self.out_dir / BEST
        if not path.exists():
            return
        state = RunState.load(path)
        if state.config.model != self.cfg.model:
            raise ValueError(f"{path} holds a model of another config; retrain or delete it.")
        self.tower.load_state_dict(state.tower)
        self.store.load_state_dict(state.store)

    def result(self) -> TrainResult:
        """The current model (the best one after :meth:`load_best`) for evaluation and export."""
        enc, tables = self.encoder()
        return TrainResult(
            self.cfg, self.ds, enc.tower, tables, self.curves, self.best_epoch, self.global_step
        )


@dataclass
class TrainResult:
    """What a training backend hands to evaluation and export: the best epoch's model.

    ``tower`` is a CPU user tower, ``tables`` the full item tables (name -> ``[R, D]``);
    ``recoveries`` counts the Ray backend's rollbacks (None in process).
    """

    cfg: TrainConfig
    dataset: Dataset
    tower: UserTower | SequenceTower
    tables: dict[str, torch.Tensor]
    curves: list[dict]
    best_epoch: int  # 0-based
    global_step: int
    recoveries: int | None = None

    def encoder(self) -> UserEncoder:
        return user_encoder(self.tower, self.tables, self.dataset)


def train_local(
    cfg: TrainConfig, resume: bool = False, dataset: Dataset | None = None
) -> TrainResult:
    """Train in this process (from ``checkpoint.pt`` if ``resume`` and there is one)."""
    trainer = Trainer(cfg, dataset)
    if resume and (trainer.out_dir / CHECKPOINT).exists():
        trainer.load_checkpoint()
    trainer.fit()
    trainer.load_best()
    return trainer.result()


def score_function(enc: UserEncoder, tables: dict[str, torch.Tensor], ds: Dataset):
    """``score_fn(positions) -> [b, num_items]`` for :func:`trainer.metrics.evaluate`.

    Users are encoded from the history before each target position, with example age 0.
    """
    out, bias = tables["output"], tables["bias"]

    def score_fn(positions: np.ndarray) -> torch.Tensor:
        batch = make_batch(ds, positions, with_age=False)
        user = enc.encode(batch.history, batch.user_features)
        return torch.addmm(bias, user, out.t())

    return score_fn


def evaluate_model(
    ds: Dataset,
    enc: UserEncoder,
    tables: dict[str, torch.Tensor],
    split: str,
    ks,
    max_examples: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Full-ranking metrics (filtered and unfiltered) of the model on a split."""
    return metrics.evaluate(
        ds,
        score_function(enc, tables, ds),
        split,
        ks=tuple(ks),
        max_examples=max_examples,
        seed=seed,
        progress=progress,
    )
