"""Acknowledged watch events survive a SIGKILL of the server process (SQLite WAL, fsync; Redis
AOF with appendfsync always, also a SIGKILL of redis-server) and are used by the restarted
server."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.procs import NotYet, wait_until
from tests.service.live import RedisServer, ServerProcess
from tests.service.test_api import KEY, WRITE

KEYS = {"SHARDREC_API_KEYS": KEY}


def test_events_survive_sigkill_and_restart(artifacts_a: Path, tmp_path: Path) -> None:
    artifacts = Path(shutil.copytree(artifacts_a, tmp_path / "a"))
    db = tmp_path / "state" / "histories.sqlite"
    args = ["--artifacts", str(artifacts), "--db-path", str(db), "--kind", "exact"]
    log = tmp_path / "server.log"

    with ServerProcess(args, env=KEYS, log=log) as first:
        c = httpx.Client(base_url=first.url, timeout=30)
        before = c.post("/v1/recommend", json={"user_id": "durable", "k": 5}).json()
        assert before["source"] == "popularity"
        watched = [i["item_id"] for i in before["items"][:3]]
        for item in watched:  # three separate acknowledged appends
            r = c.post("/v1/users/durable/events", json={"items": [item]}, headers=WRITE)
            assert r.status_code == 200, r.text
        expected = c.post("/v1/recommend", json={"user_id": "durable", "k": 5}).json()
        c.close()
        first.kill()  # no shutdown hook, no checkpoint
        assert first.proc is not None and first.proc.returncode == -9

    with (
        ServerProcess(args, env=KEYS, log=log) as second,
        httpx.Client(base_url=second.url, timeout=30) as c,
    ):
        history = c.get("/v1/users/durable/history").json()
        assert history["items"] == watched and history["length"] == 3
        after = c.post("/v1/recommend", json={"user_id": "durable", "k": 5}).json()
        assert after["source"] == "model" and after["history_length"] == 3
        assert not set(watched) & {i["item_id"] for i in after["items"]}
        assert after["items"] == expected["items"]
        # the restart did not re-seed (same model version): training histories intact once
        assert c.get("/v1/users/1/history").json()["length"] > 0
    assert "seed skipped" in log.read_text()


def test_two_worker_processes_share_the_store(artifacts_a: Path, tmp_path: Path) -> None:
    artifacts = Path(shutil.copytree(artifacts_a, tmp_path / "a"))
    args = [
        "--artifacts",
        str(artifacts),
        "--db-path",
        str(tmp_path / "h.sqlite"),
        "--kind",
        "exact",
        "--workers",
        "2",
    ]
    with (
        ServerProcess(args, env=KEYS, log=tmp_path / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        for _ in range(20):  # whichever worker answers, the store is shared
            r = c.post("/v1/users/w/events", json={"items": ["1"]}, headers=WRITE)
            assert r.status_code == 200
        assert c.get("/v1/users/w/history").json()["length"] == 20
        body = c.post("/v1/recommend", json={"user_id": "w", "k": 3}).json()
        assert body["source"] == "model" and "1" not in [i["item_id"] for i in body["items"]]


EVENTS = 1000


@pytest.mark.timeout(600)
def test_events_survive_sigkill_of_the_api_and_of_redis(artifacts_a: Path, tmp_path: Path) -> None:
    """A client appends events one by one; after 1,000+ acknowledgements the API is SIGKILLed
    mid-stream, then redis-server; both restarted, every acknowledged event is there, in order
    (at most the one in flight when the API died is extra), and feeds the next answer."""
    artifacts = Path(shutil.copytree(artifacts_a, tmp_path / "a"))
    redis = RedisServer(tmp_path / "redis").start()
    env = {**KEYS, "SHARDREC_REDIS_URL": redis.url}
    args = ["--artifacts", str(artifacts), "--store", "redis", "--kind", "exact"]
    args += ["--max-history", "5000", "--no-access-log"]
    acked: list[str] = []
    try:
        with ServerProcess(args, env=env, log=tmp_path / "api-1.log") as api:

            def write() -> None:
                with httpx.Client(base_url=api.url, timeout=10) as c:
                    for i in range(100_000):
                        try:
                            item = str(1 + i % 300)  # catalogue items, in a known order
                            r = c.post("/v1/users/d/events", json={"items": [item]}, headers=WRITE)
                        except httpx.HTTPError:
                            return  # the API is gone
                        assert r.status_code == 200, r.text
                        assert r.json()["history_length"] == i + 1
                        acked.append(item)

            writer = threading.Thread(target=write)
            writer.start()

            def enough() -> None:
                if len(acked) < EVENTS:
                    raise NotYet(f"{len(acked)} acknowledged")

            wait_until(enough, f"{EVENTS} acknowledged events", 300, api.proc)
            api.kill()  # mid-stream
            writer.join(timeout=60)
            assert not writer.is_alive()
        redis.kill()
        redis.start()
        with (
            ServerProcess(args, env=env, log=tmp_path / "api-2.log") as api,
            httpx.Client(base_url=api.url, timeout=30) as c,
        ):
            history = c.get("/v1/users/d/history", params={"limit": 100_000}).json()["items"]
            body = c.post("/v1/recommend", json={"user_id": "d", "k": 3}).json()
    finally:
        redis.stop()
    assert len(acked) >= EVENTS
    assert history[: len(acked)] == acked
    assert len(history) in (len(acked), len(acked) + 1)
    assert body["source"] == "model" and body["history_length"] > 0
