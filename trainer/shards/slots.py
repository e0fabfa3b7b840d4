"""Two-slot checkpoint files: a crash while writing always leaves the previous step readable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from trainer.embeddings import atomic_torch_save

logger = logging.getLogger(__name__)


def prev_path(path: Path) -> Path:
    """The previous slot of a checkpoint file: ``shard-0.pt`` -> ``shard-0.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_slotted(obj: dict, path: Path) -> None:
    """Atomically write ``obj`` (a dict with a ``"step"``) to ``path``, keeping the old file.

    The file at ``path`` is first renamed to :func:`prev_path` (atomic), then the new one is
    written atomically. A crash at any point leaves the last complete checkpoint in one of the
    two slots, so :func:`load_slotted` can always find the step the trainer checkpoint names.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.replace(path, prev_path(path))
    atomic_torch_save(obj, path)


def slot_steps(path: Path) -> dict[int, Path]:
    """Step -> file for the (up to two) slots of ``path`` that exist and load."""
    found: dict[int, Path] = {}
    for p in (prev_path(path), path):  # the current slot wins a tie
        if p.exists():
            try:
                found[int(torch.load(p, weights_only=True, mmap=True)["step"])] = p
            except (OSError, RuntimeError, KeyError, EOFError) as e:  # a torn/foreign file
                logger.warning("ignoring unreadable checkpoint %s (%s)", p, e)
    return found


def load_slotted(path: Path, step: int) -> dict:
    """The checkpoint for ``step`` from the two slots of ``path``.

    Raises:
        ValueError: when neither slot holds ``step`` (naming the steps that are there).
    """
    found = slot_steps(path)
    if step not in found:
        raise ValueError(
            f"no checkpoint for step {step} at {path} (or {prev_path(path).name}); found steps "
            f"{sorted(found)}. The run directory is inconsistent: restart the run without "
            f"--resume, or restore the shard files written with the trainer checkpoint."
        )
    return torch.load(found[step], weights_only=True)
