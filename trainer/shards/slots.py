"""Two-slot checkpoint files: a crash while writing always leaves the previous step readable.

The files live in any :mod:`trainer.storage` location (a local path or a URI).
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.storage import StoragePath

logger = logging.getLogger(__name__)

Location = str | Path | StoragePath


def prev_path(path: Location) -> StoragePath:
    """The previous slot of a checkpoint file: ``shard-0.pt`` -> ``shard-0.prev.pt``."""
    path = StoragePath.of(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_slotted(obj: dict, path: Location) -> None:
    """Atomically write ``obj`` (a dict with a ``"step"``) to ``path``, keeping the old file.

    The file at ``path`` is first moved to :func:`prev_path` (atomic on a local disk; on an
    object store a copy, then a delete of the source), then the new one is written atomically.
    A crash at any point leaves the last complete checkpoint in one of the two slots, so
    :func:`load_slotted` can always find the step the trainer checkpoint names.
    """
    path = StoragePath.of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.replace(prev_path(path))
    path.save_torch(obj)


def slot_steps(path: Location) -> dict[int, StoragePath]:
    """Step -> file for the (up to two) slots of ``path`` that exist and load."""
    path = StoragePath.of(path)
    found: dict[int, StoragePath] = {}
    for p in (prev_path(path), path):  # the current slot wins a tie
        if p.exists():
            try:
                found[int(p.load_torch(mmap=True)["step"])] = p
            except (OSError, RuntimeError, KeyError, EOFError) as e:  # a torn/foreign file
                logger.warning("ignoring unreadable checkpoint %s (%s)", p, e)
    return found


def load_slotted(path: Location, step: int) -> dict:
    """The checkpoint for ``step`` from the two slots of ``path``.

    Raises:
        ValueError: when neither slot holds ``step`` (naming the steps that are there).
    """
    path = StoragePath.of(path)
    found = slot_steps(path)
    if step not in found:
        raise ValueError(
            f"no checkpoint for step {step} at {path} (or {prev_path(path).name}); found steps "
            f"{sorted(found)}. The run directory is inconsistent: restart the run without "
            f"--resume, or restore the shard files written with the trainer checkpoint."
        )
    return found[step].load_torch()
