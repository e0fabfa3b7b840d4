"""The run state: what ``checkpoint.pt`` and ``best.pt`` hold, with one save and one load.

Both trainers (in process, and each Ray worker) write and read the same object. Its ``store``
entry is the item store's own state: the tables themselves in process, a reference to shard
files (:func:`trainer.shards.client.check_ref`) when sharded; a sharded ``checkpoint.pt`` is
the commit point, written after every shard has written its file for the same step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import TrainConfig, config_from_json
from trainer.storage import StoragePath

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FORMAT = "run-state-v1"


@dataclass
class WorkerState:
    """One trainer worker's random state, and its losses in the epoch under way."""

    gen: torch.Tensor  # the negative sampler's torch.Generator state (uint8)
    torch_rng: torch.Tensor  # torch's global RNG state (dropout)
    epoch_log: list[tuple[float, int]] = field(default_factory=list)  # (loss, examples)/step


@dataclass
class RunState:
    """Everything a run needs to go on exactly where it stopped.

    ``workers`` holds one :class:`WorkerState` per rank (one for the in-process trainer);
    ``dense_opt`` is the tower optimizer's state.
    """

    config: TrainConfig
    tower: dict[str, torch.Tensor]  # the user tower's state_dict, on the CPU
    store: dict  # the item store's state_dict (tables, or a shard-file reference)
    epoch: int  # epochs completed
    batch_in_epoch: int = 0
    global_step: int = 0
    best: float = -math.inf  # best validation score of ``config.monitor`` so far
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    curves: list[dict] = field(default_factory=list)  # one row of metrics per epoch
    dense_opt: dict | None = None
    workers: list[WorkerState] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def save(self, path: str | Path | StoragePath) -> StoragePath:
        """Write atomically to ``path`` (a local path or a storage URI, see
        :mod:`trainer.storage`); returns it."""
        state = {
            **self.__dict__,
            "config": self.config.to_json(),
            "curves": json.dumps(self.curves),
            "workers": [
                {**w.__dict__, "epoch_log": list(map(list, w.epoch_log))} for w in self.workers
            ],
            "world_size": self.world_size,
            "format": FORMAT,
        }
        path = StoragePath.of(path)
        path.save_torch(state)
        return path

    @classmethod
    def load(cls, path: str | Path | StoragePath, mmap: bool = False) -> RunState:
        """Read a file written by :meth:`save` (``mmap``: map a local file's tensors, read on
        use).

        Raises:
            ValueError: for a file of the trainer before this format.
        """
        state = StoragePath.of(path).load_torch(mmap=mmap)
        if state.pop("format", None) != FORMAT:
            raise ValueError(
                f"{path} is not a run state of format {FORMAT!r} (an older trainer wrote it?); "
                f"train again without --resume, or in a new out_dir."
            )
        state.pop("world_size")
        state["config"] = config_from_json(state["config"])
        state["curves"] = json.loads(state["curves"])
        state["workers"] = [
            WorkerState(w["gen"], w["torch_rng"], [(float(x), int(n)) for x, n in w["epoch_log"]])
            for w in state["workers"]
        ]
        return cls(**state)

    def check_resumable(self, cfg: TrainConfig, world_size: int, path) -> None:
        """Raise ValueError unless a run of ``cfg`` with ``world_size`` workers can resume
        from this state (read from ``path``)."""
        if self.config.model != cfg.model or self.config.data != cfg.data:
            raise ValueError(
                f"checkpoint {path} was written for another model or data config; resume with "
                f"the config saved in it ({path.parent / 'config.json'})."
            )
        if self.world_size != world_size:
            raise ValueError(
                f"checkpoint {path} was written by {self.world_size} workers, this run has "
                f"{world_size}; resume with --num-workers {self.world_size}."
            )
