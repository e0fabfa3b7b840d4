"""Durable user watch histories in an embedded SQLite database (the default store).

`SQLiteHistoryStore` keeps, per user, the ordered list of watched items (original ids, as strings).
The service seeds it from the training data and appends live watch events; the user tower
reads the most recent ``limit`` items.

Durability. The database runs in WAL mode with ``synchronous=FULL`` by default: a commit
returns only after the WAL is fsynced, so an acknowledged `append` survives a killed process
and also an OS crash or power loss. ``synchronous="NORMAL"`` (WAL still) survives a killed
process but may lose the last commits on power loss; it is faster on slow disks.

Threads and processes. Each thread gets its own connection (reads run concurrently under WAL);
writes take SQLite's write lock up front (``BEGIN IMMEDIATE``) so concurrent appends to one user
never interleave or lose an update, also from several processes on one database file. All
methods block on disk I/O: call them from a thread pool in async code.

Schema: ``events(user_id, seq, item_id, ts)`` keyed by ``(user_id, seq)``, ``seq`` = 0, 1, ...
in order of arrival per user, ``users(user_id, length)``, and ``meta(key, value)`` (the seeded
model version, the model pointer as JSON, locks as JSON ``{owner, expires}``).

Every process on one machine that opens the same file shares it: ``serve --workers N`` needs no
other store. Replicas on several machines need the networked store (`service.store.redis`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from service.store.base import ModelPointer, StoreBase
from service.store.checks import check_id, check_items, check_limit, check_timestamps, prepare_seed

logger = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

_SEED_BATCH = 10_000
_HISTORY = "SELECT item_id FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?"


class SQLiteHistoryStore(StoreBase):
    """User watch histories, most recent last, in SQLite (see the module docstring).

    Args:
        path: database file; parent directories are created. The WAL (``-wal``, ``-shm``) files
            live next to it.
        synchronous: ``"FULL"`` (default; durable across power loss) or ``"NORMAL"`` (durable
            across process kills only).
        busy_timeout_s: how long a writer waits for another writer's lock before failing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 10.0,
    ) -> None:
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}; use "
                "'FULL' (survives power loss) or 'NORMAL' (survives process kills)."
            )
        if not busy_timeout_s > 0:
            raise ValueError(f"busy_timeout_s must be > 0 seconds, got {busy_timeout_s!r}.")
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = sync
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        with self._write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        self._check_schema()
        logger.info("history store %s (WAL, synchronous=%s)", self._path, sync)

    # ------------------------------------------------------------------ connections

    @property
    def path(self) -> Path:
        return self._path

    def describe(self) -> str:
        return f"SQLite {self._path} (synchronous={self._synchronous})"

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"SQLiteHistoryStore({self._path}) is closed; open a new one.")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # only `close` touches it from another thread
                timeout=self._busy_timeout_ms / 1000,
            )
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.close()
                raise RuntimeError(
                    f"could not put {self._path} in WAL mode (got journal_mode={mode!r}); the "
                    "store needs a local file system that supports shared memory."
                )
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start; commits on exit."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection (call once no thread uses the store any more)."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
            self._closed = True
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _check_schema(self) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            elif row[0] != SCHEMA_VERSION:
                raise ValueError(
                    f"{self._path} has history schema version {row[0]!r}, expected "
                    f"{SCHEMA_VERSION!r}; migrate it or point db_path to a new file."
                )

    # ------------------------------------------------------------------ reads

    def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        """`history` of each of ``user_ids`` ``[B]`` (one connection, one prepared statement)."""
        limit = check_limit(limit)
        execute = self._conn().execute
        out = []
        for user_id in user_ids:
            rows = execute(_HISTORY, (user_id, limit)).fetchall()
            out.append([row[0] for row in reversed(rows)])
        return out

    def length(self, user_id: str) -> int:
        """Number of events stored for ``user_id`` (0 for unknown users)."""
        user_id = check_id(user_id, "user_id")
        row = self._conn().execute("SELECT length FROM users WHERE user_id = ?", (user_id,))
        found = row.fetchone()
        return int(found[0]) if found else 0

    def count(self) -> int:
        """Total number of stored events (all users)."""
        return int(self._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def num_users(self) -> int:
        """Number of users with at least one event."""
        return int(self._conn().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def model_version(self) -> str | None:
        """The model version recorded by the last `seed` (None if never seeded with one)."""
        return self._meta("model_version")

    def _meta(self, key: str) -> str | None:
        found = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    # ------------------------------------------------------------------ pointer, locks

    def read_pointer(self) -> ModelPointer | None:
        value = self._meta("pointer")
        return ModelPointer.from_mapping(json.loads(value)) if value else None

    def publish_pointer(self, version: str, path: str, base: str) -> ModelPointer:
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'pointer'").fetchone()
            serial = json.loads(row[0])["serial"] + 1 if row else 1
            pointer = ModelPointer(version, str(path), serial, str(base), time.time())
            _set_meta(conn, "pointer", pointer.to_json())
        return pointer

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        key = f"lock:{check_id(name, 'name')}"
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None:
                held = json.loads(row[0])
                if held["owner"] != owner and held["expires"] > now:
                    return False
            _set_meta(conn, key, json.dumps({"owner": owner, "expires": now + ttl_s}))
        return True

    def release_lock(self, name: str, owner: str) -> None:
        key = f"lock:{check_id(name, 'name')}"
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None and json.loads(row[0])["owner"] == owner:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    # ------------------------------------------------------------------ writes

    def append(
        self,
        user_id: str,
        item_ids: Sequence[str],
        timestamps: Sequence[float] | None = None,
    ) -> int:
        """Append watched ``item_ids`` (in order) to ``user_id``'s history; returns its new length.

        ``timestamps`` (unix seconds, one per item) default to now. The events are durable once
        this returns (see the module docstring); an empty ``item_ids`` changes nothing.
        """
        user_id = check_id(user_id, "user_id")
        items = check_items(item_ids)
        stamps = check_timestamps(timestamps, len(items))
        with self._write() as conn:
            row = conn.execute("SELECT length FROM users WHERE user_id = ?", (user_id,)).fetchone()
            start = int(row[0]) if row else 0
            if not items:
                return start
            conn.executemany(
                "INSERT INTO events (user_id, seq, item_id, ts) VALUES (?, ?, ?, ?)",
                [(user_id, start + i, item, ts) for i, (item, ts) in enumerate(zip(items, stamps))],
            )
            new_length = start + len(items)
            conn.execute(
                "INSERT INTO users (user_id, length) VALUES (?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET length = excluded.length",
                (user_id, new_length),
            )
        return new_length

    def seed(
        self,
        user_histories: Mapping[str, Iterable[tuple[str, float]]],
        model_version: str | None = None,
    ) -> int:
        """Load initial histories; idempotent. Returns the number of events written (0 if skipped).

        ``user_histories`` maps user id -> ``(item_id, timestamp)`` pairs; each history is stored
        sorted by timestamp (stable for ties). Seeding happens when the store is empty, or when
        ``model_version`` is given and differs from the recorded one: then all stored histories,
        including events appended since the last seed, are replaced (one transaction, logged).
        Otherwise the call is a no-op, so a restarted service does not duplicate its seed.
        """
        if model_version is not None:
            model_version = check_id(model_version, "model_version")
        prepared = prepare_seed(user_histories)

        with self._write() as conn:
            has_events = conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None
            row = conn.execute("SELECT value FROM meta WHERE key = 'model_version'").fetchone()
            current = row[0] if row else None
            if has_events and (model_version is None or model_version == current):
                logger.info(
                    "history store already seeded (model version %s); seed skipped", current
                )
                return 0
            if has_events:
                dropped = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                logger.warning(
                    "re-seeding histories for model version %s (was %s): replacing %d events",
                    model_version,
                    current,
                    dropped,
                )
                conn.execute("DELETE FROM events")
                conn.execute("DELETE FROM users")
            written = 0
            batch: list[tuple[str, int, str, float]] = []
            lengths: list[tuple[str, int]] = []
            for user_id, pairs in prepared:
                if not pairs:
                    continue
                batch.extend((user_id, seq, item, ts) for seq, (item, ts) in enumerate(pairs))
                lengths.append((user_id, len(pairs)))
                if len(batch) >= _SEED_BATCH:
                    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", batch)
                    written += len(batch)
                    batch = []
            if batch:
                conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", batch)
                written += len(batch)
            conn.executemany("INSERT INTO users (user_id, length) VALUES (?, ?)", lengths)
            meta = [("seeded_at", str(time.time()))]
            if model_version is not None:
                meta.append(("model_version", model_version))
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                meta,
            )
        logger.info(
            "seeded %d events for %d users (model version %s)", written, len(lengths), model_version
        )
        return written


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
