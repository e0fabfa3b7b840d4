"""What every history store offers (`HistoryStore` protocol) and the model version pointer.

A store keeps, per user, the ordered list of watched items (original ids, as strings), the
model version its histories were seeded for, and the *model pointer*: which artifact directory
every serving process should answer from. A reload publishes a new pointer (after verifying
the artifacts); every process of the fleet (workers and replicas sharing the store) watches it
and moves to it (`service.fleet`). Stores also give out short-lived named locks, so that one
reload runs at a time across processes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from service.store.checks import check_id, group_rows

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (this module supports 3.10)


@dataclasses.dataclass(frozen=True)
class ModelPointer:
    """The model every process should serve.

    Attributes:
        version: the model version of the artifacts at ``path``.
        path: the artifact directory (the same path on every process of the fleet).
        serial: 1, 2, ... in order of publication (a process moves when it sees a larger one).
        base: the ``artifacts`` setting of the deployment that published the first pointer; a
            process started with another one is a new deployment and publishes its own.
        published_at: unix seconds.
    """

    version: str
    path: str
    serial: int
    base: str
    published_at: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelPointer:
        return cls(
            version=str(values["version"]),
            path=str(values["path"]),
            serial=int(values["serial"]),
            base=str(values["base"]),
            published_at=float(values["published_at"]),
        )


class HistoryStore(Protocol):
    """User histories, the model pointer and locks (SQLite: `SQLiteHistoryStore`, Redis:
    `RedisHistoryStore`). Every method blocks on I/O: call them from threads in async code."""

    def describe(self) -> str:
        """Where the store lives, for logs (no credentials)."""
        ...

    def history(self, user_id: str, limit: int) -> list[str]:
        """The last ``limit`` item ids of ``user_id``, oldest first (unknown users: [])."""
        ...

    def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        """`history` of each of ``user_ids`` ``[B]`` in one round trip: ``[B]`` lists."""
        ...

    def length(self, user_id: str) -> int:
        """Events stored for ``user_id`` (0 for unknown users)."""
        ...

    def count(self) -> int:
        """Events stored, all users."""
        ...

    def num_users(self) -> int:
        """Users with at least one event."""
        ...

    def model_version(self) -> str | None:
        """The model version of the last `seed` (None if never seeded with one)."""
        ...

    def append(
        self, user_id: str, item_ids: Sequence[str], timestamps: Sequence[float] | None = None
    ) -> int:
        """Append ``item_ids`` (in order) to ``user_id``'s history, durable on return; the new
        length."""
        ...

    def seed_rows(
        self, rows: Iterable[tuple[str, str, float]], model_version: str | None = None
    ) -> int:
        """`seed` from flat ``(user_id, item_id, timestamp)`` rows."""
        ...

    def seed(
        self,
        user_histories: Mapping[str, Iterable[tuple[str, float]]],
        model_version: str | None = None,
    ) -> int:
        """Initial histories when empty, or replacing all when ``model_version`` differs from
        the recorded one; else nothing. The events written."""
        ...

    def read_pointer(self) -> ModelPointer | None:
        """The published model pointer (None before the first)."""
        ...

    def publish_pointer(self, version: str, path: str, base: str) -> ModelPointer:
        """Publish a new pointer (its serial one more than the last); returns it."""
        ...

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lock ``name`` for ``owner`` for ``ttl_s`` seconds unless another owner
        holds it; whether it was taken."""
        ...

    def release_lock(self, name: str, owner: str) -> None:
        """Release ``name`` if ``owner`` holds it."""
        ...

    def close(self) -> None: ...


class StoreBase:
    """What both stores do the same way on top of their own `histories`, `seed` and `close`."""

    def history(self, user_id: str, limit: int) -> list[str]:
        """The last ``limit`` item ids watched by ``user_id``, oldest first (most recent last).

        Unknown users have an empty history.
        """
        return self.histories([check_id(user_id, "user_id")], limit)[0]  # type: ignore[attr-defined]

    def seed_rows(
        self, rows: Iterable[tuple[str, str, float]], model_version: str | None = None
    ) -> int:
        """`seed` from flat ``(user_id, item_id, timestamp)`` rows (e.g. a histories.csv reader).

        The rows are grouped per user in memory first; returns the number of events written.
        """
        return self.seed(group_rows(rows), model_version)  # type: ignore[attr-defined]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]
