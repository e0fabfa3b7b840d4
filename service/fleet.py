"""One model version across worker processes and replicas: the store's model pointer, seen from
one process (`Fleet`).

Every process that shares a history store (uvicorn workers on one SQLite file, replicas on one
Redis) reads the store's `ModelPointer`:

* at start-up, a process started with the fleet's ``artifacts`` setting (the pointer's
  ``base``) joins the fleet: it loads the pointer's artifacts, the fleet's current model. A
  process started with other artifacts is a new deployment: it publishes its own pointer, and
  the others move to it. The first process of an empty store publishes the first pointer;
* a reload through any process verifies the new artifacts, swaps them in there and then
  publishes a new pointer; a refused (corrupt) artifact is never published;
* every process polls the pointer (``reload_poll_s``) and, on a newer serial naming another
  model, loads it (verified again, its saved index loaded) and swaps it in; until that swap it
  answers from its old model. A failed follow is logged and retried only for a newer pointer.

Plain code (no web framework): the app's state calls it from a thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.store import HistoryStore, ModelPointer

logger = logging.getLogger(__name__)


class Fleet:
    """The pointer of ``store`` as this process sees it.

    Args:
        store: the shared history store.
        base: this process's ``artifacts`` setting (resolved).
    """

    def __init__(self, store: HistoryStore, base: Path) -> None:
        self.store = store
        self.base = str(Path(base).resolve())
        self.serial = 0  # the newest pointer this process has acted on
        self.failed: dict[int, str] = {}  # serial -> why following it failed

    def startup_path(self) -> Path:
        """The artifacts to load at start-up: the fleet's current model when this process
        belongs to its deployment, else this process's own artifacts."""
        pointer = self.store.read_pointer()
        if pointer is not None and pointer.base == self.base:
            logger.info(
                "joining the fleet on model %s (pointer %d: %s)",
                pointer.version,
                pointer.serial,
                pointer.path,
            )
            return Path(pointer.path)
        return Path(self.base)

    def started(self, version: str, path: Path) -> ModelPointer:
        """Record the model loaded at start-up; publishes it when the fleet has no pointer of
        this deployment, or one naming another model."""
        pointer = self.store.read_pointer()
        path_s = str(Path(path).resolve())
        if pointer is None or pointer.base != self.base or pointer.version != version:
            pointer = self.store.publish_pointer(version, path_s, self.base)
            logger.info("published model %s as pointer %d", version, pointer.serial)
        self.serial = max(self.serial, pointer.serial)
        return pointer

    def publish(self, version: str, path: Path) -> ModelPointer:
        """Publish a reloaded model (after its swap here)."""
        pointer = self.store.publish_pointer(version, str(Path(path).resolve()), self.base)
        self.serial = max(self.serial, pointer.serial)
        logger.info("published model %s as pointer %d", version, pointer.serial)
        return pointer

    def to_follow(self, current_version: str) -> ModelPointer | None:
        """The newer pointer this process should move to, if any (None: nothing to do)."""
        pointer = self.store.read_pointer()
        if pointer is None or pointer.serial <= self.serial or pointer.serial in self.failed:
            return None
        if pointer.version == current_version:
            self.serial = pointer.serial
            return None
        return pointer

    def followed(self, pointer: ModelPointer) -> None:
        self.serial = max(self.serial, pointer.serial)

    def follow_failed(self, pointer: ModelPointer, reason: str) -> None:
        self.failed[pointer.serial] = reason
        logger.error(
            "cannot move to model %s (pointer %d, %s); still serving the old model: %s",
            pointer.version,
            pointer.serial,
            pointer.path,
            reason,
        )
