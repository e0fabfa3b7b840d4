"""History stores: embedded SQLite (the default, one machine) or Redis (shared by replicas).

`open_store(settings)` opens the one the settings name. Both implement `HistoryStore`
(`service.store.base`): per-user histories, batched reads, seeding per model version, the
model pointer that keeps every process on one model version, and named locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.store.base import HistoryStore, ModelPointer
from service.store.sqlite import SQLiteHistoryStore

if TYPE_CHECKING:
    from service.settings import ServiceSettings

__all__ = ["HistoryStore", "ModelPointer", "SQLiteHistoryStore", "open_store"]


def open_store(settings: ServiceSettings) -> HistoryStore:
    """The history store of ``settings`` (``store``: ``"sqlite"`` or ``"redis"``)."""
    if settings.store == "redis":
        from service.store.redis_store import RedisHistoryStore

        return RedisHistoryStore(
            settings.redis_url.get_secret_value(),
            prefix=settings.redis_prefix,
            keep=settings.max_history,
        )
    assert settings.db_path is not None
    return SQLiteHistoryStore(settings.db_path, synchronous=settings.db_synchronous)
