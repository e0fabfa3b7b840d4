"""service.store, SQLite and Redis alike: ordering, seeding, validation, batched reads, the model
pointer and locks, durability (close/reopen, SIGKILL of the writer and of redis-server over more
than 1,000 acknowledged events), threads."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.store import HistoryStore, SQLiteHistoryStore
from tests.procs import NotYet, Proc, wait_until
from tests.service.live import REPO, RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest, **kw) -> HistoryStore:
    """A new, empty store of ``kind`` (a Redis store gets its own key prefix)."""
    if kind == "sqlite":
        return SQLiteHistoryStore(tmp_path / "h.sqlite", **kw)
    from service.store.redis_store import RedisHistoryStore

    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisHistoryStore(server.url, prefix=f"t{abs(hash(tmp_path))}:", **kw)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    s = open_store(request.param, tmp_path, request)
    yield s
    s.close()


def test_history_is_most_recent_last_and_limited(store: HistoryStore) -> None:
    assert store.append("u1", ["a", "b"], [1.0, 2.0]) == 2
    assert store.append("u1", ["c"]) == 3
    assert store.append("u2", ["x"]) == 1
    assert store.history("u1", 10) == ["a", "b", "c"]
    assert store.history("u1", 2) == ["b", "c"]
    assert store.history("nobody", 5) == []
    assert store.length("u1") == 3 and store.length("nobody") == 0
    assert store.count() == 4 and store.num_users() == 2
    assert store.append("u1", []) == 3  # nothing to add


def test_batched_reads_match_single_reads(store: HistoryStore) -> None:
    for u in range(5):
        store.append(f"u{u}", [f"i{u}-{j}" for j in range(u * 3)])
    users = ["u3", "nobody", "u1", "u3", "u0", "u4"]
    assert store.histories(users, 4) == [store.history(u, 4) for u in users]
    assert store.histories(users, 4)[0] == ["i3-5", "i3-6", "i3-7", "i3-8"]
    assert store.histories([], 4) == []


def test_model_pointer_serials_and_locks(store: HistoryStore) -> None:
    assert store.read_pointer() is None
    first = store.publish_pointer("v1", "/models/a", "/models/a")
    second = store.publish_pointer("v2", "/models/b", "/models/a")
    assert (first.serial, second.serial) == (1, 2)
    assert store.read_pointer() == second
    assert store.acquire_lock("reload", "me", 30.0)
    assert store.acquire_lock("reload", "me", 30.0)  # the owner again: extended
    assert not store.acquire_lock("reload", "you", 30.0)
    store.release_lock("reload", "you")  # not the owner: nothing happens
    assert not store.acquire_lock("reload", "you", 30.0)
    store.release_lock("reload", "me")
    assert store.acquire_lock("reload", "you", 0.2)
    wait_until(  # an expired lock is free again
        lambda: store.acquire_lock("reload", "me", 30.0) or _not_yet("held"), "expiry", 5
    )


def _not_yet(what: str) -> bool:
    raise NotYet(what)


def test_wal_and_synchronous_modes(tmp_path: Path) -> None:
    with SQLiteHistoryStore(tmp_path / "full.sqlite") as s:
        conn = s._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with SQLiteHistoryStore(tmp_path / "normal.sqlite", synchronous="normal") as s:
        assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with pytest.raises(ValueError, match="synchronous must be one of"):
        SQLiteHistoryStore(tmp_path / "x.sqlite", synchronous="OFF")


def test_redis_lists_are_trimmed_but_lengths_count_everything(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with open_store("redis", tmp_path, request, keep=3) as s:
        assert s.append("u", ["a", "b"]) == 2
        assert s.append("u", ["c", "d", "e"]) == 5
        assert s.history("u", 10) == ["c", "d", "e"] and s.length("u") == 5
        assert s.append("u", []) == 5 and s.count() == 5 and s.num_users() == 1


def test_seed_is_idempotent_and_replaced_by_a_new_model_version(store: HistoryStore) -> None:
    seed = {"u1": [("b", 20.0), ("a", 10.0), ("c", 20.0)], "u2": [("z", 1.0)], "u3": []}
    assert store.seed(seed, model_version="v1") == 4
    assert store.history("u1", 10) == ["a", "b", "c"]  # sorted by time, stable on ties
    assert store.model_version() == "v1" and store.num_users() == 2
    store.append("u1", ["live"])
    assert store.seed(seed, model_version="v1") == 0  # restart: no duplicates
    assert store.seed(seed) == 0  # no version given: never re-seeds a non-empty store
    assert store.history("u1", 10) == ["a", "b", "c", "live"]
    assert store.seed({"u9": [("q", 1.0)]}, model_version="v2") == 1
    assert store.model_version() == "v2"
    assert store.history("u1", 10) == [] and store.history("u9", 10) == ["q"]
    assert store.count() == 1


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_seed_of_an_empty_store_without_version(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with open_store(kind, tmp_path, request) as s:
        assert s.seed({"u": [("i", 1)]}) == 1
        assert s.model_version() is None
        assert s.seed({"u": [("i", 1)]}) == 0


def test_seed_rows_groups_flat_rows(store: HistoryStore) -> None:
    rows = [("u1", "b", 2), ("u2", "x", 5), ("u1", "a", 1)]
    assert store.seed_rows(iter(rows), model_version="v1") == 3
    assert store.history("u1", 10) == ["a", "b"] and store.history("u2", 10) == ["x"]
    with pytest.raises(ValueError, match=r"\(user_id, item_id, timestamp\) triple"):
        store.seed_rows([("u1", "a")], model_version="v2")  # type: ignore[list-item]


def test_bad_inputs(store: HistoryStore) -> None:
    with pytest.raises(TypeError, match=r"user_id must be a str .*str\(\.\.\.\)"):
        store.append(42, ["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"wrap a single id as \[item_id\]"):
        store.append("u", "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item_ids\\[\\] must be a str"):
        store.append("u", [1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="one value per item: expected 2, got 1"):
        store.append("u", ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="finite unix seconds"):
        store.append("u", ["a"], [float("nan")])
    with pytest.raises(ValueError, match="non-empty string"):
        store.append("", ["a"])
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        store.history("u", 0)
    with pytest.raises(ValueError, match=r"\(item_id, timestamp\) pair"):
        store.seed({"u": ["a"]})  # type: ignore[list-item]
    assert store.count() == 0  # nothing partial was written


def test_writes_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with SQLiteHistoryStore(path) as s:
        s.seed({"u": [("a", 1.0)]}, model_version="v1")
        s.append("u", ["b", "c"])
    with SQLiteHistoryStore(path) as s:
        assert s.history("u", 10) == ["a", "b", "c"]
        assert s.model_version() == "v1"
    closed = SQLiteHistoryStore(path)
    closed.close()
    with pytest.raises(RuntimeError, match="is closed"):
        closed.history("u", 1)


# A writer that prints each acknowledged append: "ack <i> <length>".
WRITER = """
import sys
from service.store import SQLiteHistoryStore
from service.store.redis_store import RedisHistoryStore

kind, where = sys.argv[1], sys.argv[2]
store = SQLiteHistoryStore(where) if kind == "sqlite" else RedisHistoryStore(where, keep=100000)
i = 0
while True:
    length = store.append("u", [f"i{i}"])
    print(f"ack {i} {length}", flush=True)
    i += 1
"""
EVENTS = 1000


def acknowledged(log: Path) -> list[int]:
    """The acknowledged appends of a `WRITER` log (a cut-off last line does not count)."""
    lines = log.read_text().split("\n")[:-1]
    acks = [line.split() for line in lines if line.startswith("ack ")]
    assert all(int(length) == int(i) + 1 for _, i, length in acks)
    return [int(i) for _, i, _ in acks]


def write_until_killed(
    kind: str,
    where: str,
    log: Path,
    events: int = EVENTS,
    first: Callable[[], None] | None = None,
) -> list[int]:
    """Runs `WRITER` until it has acknowledged ``events`` appends, SIGKILLs it mid-stream (after
    calling ``first``, e.g. a SIGKILL of the store's server), and returns what it
    acknowledged."""
    writer = Proc(
        [sys.executable, "-c", WRITER, kind, where],
        log,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        err_log=log.with_suffix(".err"),
        name=f"{kind} writer",
    )
    with writer:

        def enough() -> None:
            if len(acknowledged(log)) < events:
                raise NotYet(f"{len(acknowledged(log))} acknowledged")

        wait_until(enough, f"{events} acknowledged appends", 120, writer)
        if first is not None:
            first()
        if writer.poll() is None:
            writer.kill()  # mid-stream: no clean shutdown, no final commit
    assert writer.returncode is not None and writer.returncode != 0
    return acknowledged(log)


def check_survivors(history: list[str], acked: list[int]) -> None:
    """Every acknowledged event is there, in order; at most the one in flight is extra."""
    assert len(acked) >= EVENTS
    assert history[: len(acked)] == [f"i{i}" for i in acked]
    assert len(history) in (len(acked), len(acked) + 1)
    assert history == [f"i{i}" for i in range(len(history))]


@pytest.mark.timeout(180)
def test_acknowledged_appends_survive_kill_9_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    acked = write_until_killed("sqlite", str(path), tmp_path / "writer.log")
    with SQLiteHistoryStore(path) as s:
        check_survivors(s.history("u", 1_000_000), acked)


@pytest.mark.timeout(180)
def test_acknowledged_appends_survive_kill_9_of_the_writer_and_of_redis(tmp_path: Path) -> None:
    """appendfsync always: what the writer saw acknowledged was on disk when redis-server was
    SIGKILLed mid-stream (then the writer); a restarted server on the same directory has all of
    it."""
    from service.store.redis_store import RedisHistoryStore

    server = RedisServer(tmp_path / "redis").start()
    try:
        acked = write_until_killed("redis", server.url, tmp_path / "writer.log", first=server.kill)
        server.start()  # the same port and directory: replays the append-only file
        with RedisHistoryStore(server.url, keep=100_000) as s:
            check_survivors(s.history("u", 1_000_000), acked)
    finally:
        server.stop()


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    num_threads, per_thread = 6, 40
    with SQLiteHistoryStore(path, synchronous="NORMAL") as s:
        errors: list[BaseException] = []
        lengths: list[int] = []
        barrier = threading.Barrier(num_threads)

        def worker(t: int) -> None:
            try:
                barrier.wait()
                for j in range(per_thread):
                    lengths.append(s.append("shared", [f"t{t}-{j}"]))
                    s.append(f"own{t}", [f"{j}"])
                    s.history("shared", 5)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        total = num_threads * per_thread
        assert sorted(lengths) == list(range(1, total + 1))  # no lost or duplicated update
        shared = s.history("shared", 10_000)
        assert len(shared) == total == s.length("shared")
        for t in range(num_threads):  # each thread's events keep their order
            assert [e for e in shared if e.startswith(f"t{t}-")] == [
                f"t{t}-{j}" for j in range(per_thread)
            ]
            assert s.history(f"own{t}", 10_000) == [str(j) for j in range(per_thread)]
