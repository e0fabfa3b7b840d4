"""User watch histories in Redis, shared by every API process and replica (`RedisHistoryStore`).

Layout (``p`` = the key prefix, ``g`` = the current generation, read from ``p meta``):

* ``{p}meta`` hash: ``generation``, ``model_version`` (of the last seed), ``seeded_at``,
  ``schema_version``;
* ``{p}g{g}:h:{user}`` list: the user's most recent items (oldest first), trimmed to ``keep``;
* ``{p}g{g}:len`` hash: user -> events ever appended (the history length, also past ``keep``);
* ``{p}g{g}:events``: events stored (all users); ``{p}pointer`` hash: the model pointer;
  ``{p}lock:{name}``: locks (``SET NX PX``).

An append (push, trim, count) and a batched read run as Lua scripts: each is atomic and one
round trip, whatever the number of users. A re-seed for a new model writes the next generation
and then switches ``generation`` in one step, so readers see the old histories or the new ones,
never a mix; the old generation is then deleted.

Durability is the server's: with ``appendonly yes`` and ``appendfsync always`` Redis fsyncs the
AOF before it answers, so an acknowledged append survives a SIGKILL of the API process and of
the Redis server (tested over more than 1,000 events). ``appendfsync everysec`` may lose the
last second on a server crash. `check_durability` reads the server's settings and warns.

Timestamps are not stored (the tower reads the order only). Not for Redis Cluster: the scripts
build their keys from the prefix (one server or a primary with replicas).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from service.store.base import ModelPointer, StoreBase
from service.store.checks import check_id, check_items, check_limit, check_timestamps, prepare_seed

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_PIPELINE_BATCH = 2_000
_PUSH_CHUNK = 1_000  # items per RPUSH inside the scripts (Lua's unpack has a stack limit)

_PREFIX_OF_GENERATION = """
local gen = redis.call('HGET', KEYS[1], 'generation') or '0'
local base = ARGV[1] .. 'g' .. gen .. ':'
"""

# KEYS[1] meta; ARGV: prefix, keep, user, items... -> the new length.
_APPEND = (
    _PREFIX_OF_GENERATION
    + """
local user = ARGV[3]
local n = #ARGV - 3
if n == 0 then
  return tonumber(redis.call('HGET', base .. 'len', user) or '0')
end
local key = base .. 'h:' .. user
for i = 4, #ARGV, CHUNK do
  redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + CHUNK - 1, #ARGV)))
end
redis.call('LTRIM', key, -tonumber(ARGV[2]), -1)
redis.call('INCRBY', base .. 'events', n)
return redis.call('HINCRBY', base .. 'len', user, n)
""".replace("CHUNK", str(_PUSH_CHUNK))
)

# KEYS[1] meta; ARGV: prefix, limit, users... -> one list per user.
_HISTORIES = (
    _PREFIX_OF_GENERATION
    + """
local limit = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('LRANGE', base .. 'h:' .. ARGV[i], -limit, -1)
end
return out
"""
)

# KEYS[1] pointer; ARGV: version, path, base, published_at -> the new serial.
_PUBLISH = """
local serial = redis.call('HINCRBY', KEYS[1], 'serial', 1)
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'path', ARGV[2], 'base', ARGV[3],
           'published_at', ARGV[4])
return serial
"""

# KEYS[1] lock; ARGV[1] owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as e:  # pragma: no cover - redis is a dependency of the package
        raise ImportError(
            "the Redis history store needs the redis client: pip install 'redis>=5'"
        ) from e
    return redis


class RedisHistoryStore(StoreBase):
    """User histories in Redis (see the module docstring).

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: prefix of every key (several deployments may share one server).
        keep: most recent items kept per user (the list is trimmed to it on every append).
        timeout_s: socket timeout of each command.
        client: an existing ``redis.Redis`` (tests); ``url`` is then only used in messages.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "shardrec:",
        keep: int = 1000,
        timeout_s: float = 10.0,
        client: Any = None,
    ) -> None:
        self._keep = check_limit(keep)
        if not prefix or any(c in prefix for c in " \x00\n"):
            raise ValueError(
                f"prefix must be a non-empty key prefix without spaces, got {prefix!r}; e.g. "
                "'shardrec:'."
            )
        redis = _redis_module()
        self._prefix = prefix
        self._url = url
        self._client = client or redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        self._append = self._client.register_script(_APPEND)
        self._histories = self._client.register_script(_HISTORIES)
        self._publish = self._client.register_script(_PUBLISH)
        self._release = self._client.register_script(_RELEASE)
        self._meta_key = f"{prefix}meta"
        try:
            self._client.hsetnx(self._meta_key, "schema_version", SCHEMA_VERSION)
            schema = self._client.hget(self._meta_key, "schema_version")
        except redis.RedisError as e:
            raise ConnectionError(
                f"cannot reach the Redis history store at {self.describe()}: {e}; start "
                "redis-server or fix SHARDREC_REDIS_URL"
            ) from e
        if schema != SCHEMA_VERSION:
            raise ValueError(
                f"{self.describe()} holds history schema version {schema!r}, expected "
                f"{SCHEMA_VERSION!r}; use another prefix (SHARDREC_REDIS_PREFIX) or migrate."
            )
        self.check_durability()
        logger.info("history store %s", self.describe())

    # ------------------------------------------------------------------ basics

    def describe(self) -> str:
        redis = _redis_module()
        try:
            kwargs = self._client.connection_pool.connection_kwargs
            where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
            where += f"/{kwargs.get('db', 0)}"
        except (AttributeError, redis.RedisError):
            where = "redis"
        return f"Redis {where} prefix {self._prefix!r} (keep {self._keep})"

    def check_durability(self) -> dict[str, str]:
        """The server's ``appendonly`` / ``appendfsync``; warns unless ``yes`` / ``always``."""
        try:
            found = {
                **self._client.config_get("appendonly"),
                **self._client.config_get("appendfsync"),
            }
        except _redis_module().ResponseError:  # CONFIG disabled (managed servers)
            logger.info("cannot read the Redis persistence settings (CONFIG is disabled)")
            return {}
        if found.get("appendonly") != "yes" or found.get("appendfsync") != "always":
            logger.warning(
                "Redis at %s runs appendonly=%s appendfsync=%s: acknowledged events may be lost "
                "when the Redis server dies; run it with --appendonly yes --appendfsync always",
                self.describe(),
                found.get("appendonly"),
                found.get("appendfsync"),
            )
        return found

    def close(self) -> None:
        self._client.close()

    def _generation(self) -> int:
        return int(self._client.hget(self._meta_key, "generation") or 0)

    def _base(self, generation: int) -> str:
        return f"{self._prefix}g{generation}:"

    # ------------------------------------------------------------------ reads

    def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        limit = check_limit(limit)
        if not user_ids:
            return []
        return self._histories(keys=[self._meta_key], args=[self._prefix, limit, *user_ids])

    def length(self, user_id: str) -> int:
        user_id = check_id(user_id, "user_id")
        return int(self._client.hget(f"{self._base(self._generation())}len", user_id) or 0)

    def count(self) -> int:
        return int(self._client.get(f"{self._base(self._generation())}events") or 0)

    def num_users(self) -> int:
        return int(self._client.hlen(f"{self._base(self._generation())}len"))

    def model_version(self) -> str | None:
        return self._client.hget(self._meta_key, "model_version")

    # ------------------------------------------------------------------ writes

    def append(
        self, user_id: str, item_ids: Sequence[str], timestamps: Sequence[float] | None = None
    ) -> int:
        user_id = check_id(user_id, "user_id")
        items = check_items(item_ids)
        check_timestamps(timestamps, len(items))
        length = self._append(
            keys=[self._meta_key], args=[self._prefix, self._keep, user_id, *items]
        )
        return int(length)

    def seed(
        self,
        user_histories: Mapping[str, Iterable[tuple[str, float]]],
        model_version: str | None = None,
    ) -> int:
        """See `HistoryStore.seed`; processes seeding at once take turns (a lock), and the
        later ones find the store seeded."""
        if model_version is not None:
            model_version = check_id(model_version, "model_version")
        prepared = prepare_seed(user_histories)
        with self._locked("seed", ttl_s=600.0, wait_s=600.0):
            current = self.model_version()
            old = self._generation()
            if self.num_users() and (model_version is None or model_version == current):
                logger.info(
                    "history store already seeded (model version %s); seed skipped", current
                )
                return 0
            new = old + 1
            written = self._write_generation(new, prepared)
            meta = {"generation": new, "seeded_at": time.time()}
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self._meta_key, mapping=meta)
            if model_version is not None:
                pipe.hset(self._meta_key, "model_version", model_version)
            pipe.execute()
            dropped = self._delete_generation(old)
        if dropped:
            logger.warning(
                "re-seeded histories for model version %s (was %s): replaced generation %d",
                model_version,
                current,
                old,
            )
        logger.info("seeded %d events (model version %s) into %s", written, model_version, new)
        return written

    def _write_generation(
        self, generation: int, prepared: list[tuple[str, list[tuple[str, float]]]]
    ) -> int:
        base = self._base(generation)
        self._delete_generation(generation)  # leftovers of an interrupted seed
        pipe = self._client.pipeline(transaction=False)
        written = queued = 0
        lengths: dict[str, int] = {}
        for user_id, pairs in prepared:
            if not pairs:
                continue
            items = [item for item, _ in pairs][-self._keep :]
            for start in range(0, len(items), _PUSH_CHUNK):
                pipe.rpush(f"{base}h:{user_id}", *items[start : start + _PUSH_CHUNK])
                queued += 1
            lengths[user_id] = len(pairs)
            written += len(pairs)
            if queued >= _PIPELINE_BATCH:
                pipe.execute()
                queued = 0
        if lengths:
            pipe.hset(f"{base}len", mapping=lengths)
        pipe.set(f"{base}events", written)
        pipe.execute()
        return written

    def _delete_generation(self, generation: int) -> int:
        deleted = 0
        batch: list[str] = []
        for key in self._client.scan_iter(match=f"{self._base(generation)}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self._client.unlink(*batch)
                batch = []
        if batch:
            deleted += self._client.unlink(*batch)
        return deleted

    # ------------------------------------------------------------------ pointer, locks

    def read_pointer(self) -> ModelPointer | None:
        values = self._client.hgetall(f"{self._prefix}pointer")
        return ModelPointer.from_mapping(values) if values.get("version") else None

    def publish_pointer(self, version: str, path: str, base: str) -> ModelPointer:
        now = time.time()
        serial = self._publish(
            keys=[f"{self._prefix}pointer"], args=[version, str(path), str(base), now]
        )
        return ModelPointer(version, str(path), int(serial), str(base), now)

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        key = f"{self._prefix}lock:{check_id(name, 'name')}"
        if self._client.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return True
        if self._client.get(key) == owner:  # ours already: extend it
            self._client.set(key, owner, px=int(ttl_s * 1000))
            return True
        return False

    def release_lock(self, name: str, owner: str) -> None:
        self._release(keys=[f"{self._prefix}lock:{check_id(name, 'name')}"], args=[owner])

    @contextlib.contextmanager
    def _locked(self, name: str, ttl_s: float, wait_s: float) -> Iterator[None]:
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while not self.acquire_lock(name, owner, ttl_s):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the {name!r} lock of {self.describe()} was held for more than {wait_s:.0f}s"
                    f"; another process is stuck, or delete {self._prefix}lock:{name}"
                )
            time.sleep(0.1)
        try:
            yield
        finally:
            self.release_lock(name, owner)
