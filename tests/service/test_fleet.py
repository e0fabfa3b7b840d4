"""One model version across workers and replicas (`service.fleet`): the pointer rules on a real
store, and 2 replicas x 2 uvicorn workers sharing a real redis-server under concurrent load:
events acknowledged by one replica are in the next answer of the other, a reload through one
replica moves all four processes (zero failed requests, within a bound), a corrupt artifact is
refused everywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.fleet import Fleet
from service.store import SQLiteHistoryStore
from tests.service.live import (
    REPO,
    Hammer,
    RedisServer,
    ServerProcess,
    model_versions,
    wait_versions,
)
from tests.service.test_api import KEY, TOKEN, WRITE
from tests.service.test_reload import corrupt_copy

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MOVE_BOUND_S = 30.0  # poll 0.2 s + loading the tiny model's verified artifacts and saved index
INDEX = ["--kind", "hnsw", "--m", "8", "--ef-construction", "40", "--recall-queries", "50"]


def test_pointer_rules(tmp_path: Path) -> None:
    a, b, other = (tmp_path / n for n in ("a", "b", "other"))
    for d in (a, b, other):
        d.mkdir()
    with SQLiteHistoryStore(tmp_path / "h.sqlite") as store:
        first = Fleet(store, a)
        assert first.startup_path() == a.resolve()  # an empty store: its own artifacts
        assert first.started("v1", a).serial == 1
        joining = Fleet(store, a)  # a replica of the same deployment
        assert joining.started("v1", a).serial == 1  # nothing new to publish
        assert joining.to_follow("v1") is None
        moved = first.publish("v2", b)
        assert moved.serial == 2 and first.to_follow("v2") is None
        assert joining.to_follow("v1") == moved  # a newer pointer naming another model
        joining.follow_failed(moved, "corrupt")
        assert joining.to_follow("v1") is None  # not retried until a newer pointer
        late = Fleet(store, a)
        assert late.startup_path() == b.resolve()  # joins on the fleet's current model
        new_deployment = Fleet(store, other)
        assert new_deployment.startup_path() == other.resolve()
        assert new_deployment.started("v9", other).serial == 3  # publishes its own
        assert first.to_follow("v2") is not None and joining.to_follow("v1") is not None


@pytest.fixture
def fleet(tmp_path: Path, artifacts_a: Path, artifacts_b: Path) -> Iterator[dict]:
    a = Path(shutil.copytree(artifacts_a, tmp_path / "a", ignore=shutil.ignore_patterns("index-*")))
    b = Path(shutil.copytree(artifacts_b, tmp_path / "b", ignore=shutil.ignore_patterns("index-*")))
    subprocess.run(  # build a's index once (else four processes build it at start-up)
        [sys.executable, "-m", "service", "index", "--artifacts", str(a), *INDEX],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    redis = RedisServer(tmp_path / "redis").start()
    env = {"SHARDREC_REDIS_URL": redis.url, "SHARDREC_ADMIN_TOKEN": TOKEN, "SHARDREC_API_KEYS": KEY}
    args = ["--artifacts", str(a), "--store", "redis", "--workers", "2", "--reload-poll-s", "0.2"]
    replicas = [
        ServerProcess([*args, *INDEX, "--no-access-log"], env=env, log=tmp_path / f"r{i}.log")
        for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.__enter__()
        yield {"a": a, "b": b, "urls": [r.url for r in replicas], "tmp": tmp_path}
    finally:
        for replica in replicas:
            replica.__exit__(None, None, None)
        redis.stop()


@pytest.mark.timeout(600)
def test_two_replicas_of_two_workers(fleet: dict) -> None:
    urls: list[str] = fleet["urls"]
    old = httpx.get(f"{urls[0]}/readyz").json()["model_version"]
    wait_versions(urls, 2, timeout=120, version=old)  # all four processes loaded

    # An event acknowledged by one replica is in the next answer of the other.
    for i in range(10):
        r = httpx.post(
            f"{urls[i % 2]}/v1/users/shared/events", json={"items": [str(i + 1)]}, headers=WRITE
        )
        assert r.status_code == 200 and r.json()["history_length"] == i + 1
        for url in urls:
            body = httpx.post(f"{url}/v1/recommend", json={"user_id": "shared", "k": 5}).json()
            assert body["source"] == "model" and body["history_length"] == i + 1, (url, body)
            assert str(i + 1) not in [it["item_id"] for it in body["items"]]

    corrupt = corrupt_copy(fleet["b"], fleet["tmp"] / "corrupt")
    with Hammer(urls, threads=4) as hammer:
        hammer.wait_for(100)
        r = httpx.post(
            f"{urls[1]}/v1/admin/reload",
            json={"artifacts": str(corrupt)},
            headers=ADMIN,
            timeout=120,
        )
        assert r.status_code == 422 and "checksum mismatch" in r.json()["detail"]
        hammer.wait_for(50)
        assert {url: set(model_versions(url).values()) for url in urls} == {u: {old} for u in urls}
        r = httpx.post(
            f"{urls[1]}/v1/admin/reload",
            json={"artifacts": str(fleet["b"])},
            headers=ADMIN,
            timeout=300,
        )
        reloaded_at = time.monotonic()
        assert r.status_code == 200, r.text
        new = r.json()["model_version"]
        moved_s = wait_versions(urls, 2, timeout=MOVE_BOUND_S, version=new)
        moved_at = time.monotonic()
        hammer.wait_for(100)
    print(f"\nevery process on {new} {moved_s:.2f}s after the reload answered")
    assert new != old
    assert not hammer.failures(), hammer.failures()[:5]
    assert {rec[3] for rec in hammer.records} == {old, new}
    assert {rec[3] for rec in hammer.records if rec[0] > moved_at} == {new}
    assert any(
        rec[3] == new and rec[4] == urls[0] for rec in hammer.records if rec[0] > reloaded_at
    )
    for url in urls:
        assert httpx.get(f"{url}/readyz").json()["model_version"] == new
