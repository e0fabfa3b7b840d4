"""The in-process transport: shard servers in this process (tests and single-process use)."""

from __future__ import annotations

from trainer.shards.server import ShardServer


class _Later:
    """A refresh that can only be answered once other workers' pushes are in: it runs when
    its result is asked for (the Ray actor waits for the same condition instead)."""

    def __init__(self, server: ShardServer, args: tuple) -> None:
        self.server, self.args = server, args
        self.answer = None

    def result(self):
        if self.answer is None:
            self.answer = self.server.refresh(*self.args)
            self.server.settle()
        return self.answer


class LocalShards:
    """Shard servers in this process; calls run at once and 'futures' are their results.

    A pull whose step is not applied yet cannot wait here, so it raises (the Ray actor
    waits instead); refreshes are answered when their result is collected.
    """

    def __init__(self, servers: list[ShardServer]) -> None:
        self.servers = servers
        self.calls: list[tuple[str, int]] = []  # (method, shard) in issue order, for tests

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    def call(self, shard: int, method: str, *args):
        self.calls.append((method, shard))
        server = self.servers[shard]
        if method == "refresh":
            return _Later(server, args)
        if method == "push_part" and len(args) > 5:  # a push with refreshes (see the actor)
            server.push_part(*args[:5])
            later = [_Later(server, (args[0], *r)) for r in args[5]]
            server.settle()
            return later
        result = getattr(server, method)(*args)
        if method == "pull":
            server.settle()
        return result

    def put(self, obj):
        return obj

    def get(self, futures: list, timeout: float | None = None) -> list:
        self.calls.append(("get", len(futures)))
        out = []
        for f in futures:
            if isinstance(f, _Later):
                out.append(f.result())
            elif isinstance(f, list) and f and isinstance(f[0], _Later):
                out.append([x.result() for x in f])
            else:
                out.append(f)
        return out
