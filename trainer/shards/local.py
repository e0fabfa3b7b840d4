"""The in-process transport: shard servers in this process (tests and single-process use)."""

from __future__ import annotations

from trainer.shards.server import ShardServer


class LocalShards:
    """Shard servers in this process; calls run at once and 'futures' are their results.

    A request whose step is not applied yet cannot wait here, so it raises (the Ray actor
    waits instead).
    """

    def __init__(self, servers: list[ShardServer]) -> None:
        self.servers = servers
        self.calls: list[tuple[str, int]] = []  # (method, shard) in issue order, for tests

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    def call(self, shard: int, method: str, *args):
        self.calls.append((method, shard))
        result = getattr(self.servers[shard], method)(*args)
        if method == "pull":
            self.servers[shard].settle()
        return result

    def put(self, obj):
        return obj

    def get(self, futures: list, timeout: float | None = None) -> list:
        self.calls.append(("get", len(futures)))
        return list(futures)
