"""Hot reload against a real uvicorn server: zero failed requests while a thread pool hammers
``/v1/recommend``, the model version switches, and corrupt or missing artifacts are refused while
the old model keeps serving."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from tests.service.live import Hammer, ServerThread, wait_ready
from tests.service.test_api import TOKEN, settings_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def dirs(tmp_path: Path, artifacts_a: Path, artifacts_b: Path) -> tuple[Path, Path]:
    """Private copies (reload writes the new model's index next to its artifacts)."""
    return (
        Path(
            shutil.copytree(artifacts_a, tmp_path / "a", ignore=shutil.ignore_patterns("index-*"))
        ),
        Path(
            shutil.copytree(artifacts_b, tmp_path / "b", ignore=shutil.ignore_patterns("index-*"))
        ),
    )


@pytest.fixture
def server(dirs: tuple[Path, Path], tmp_path: Path) -> Iterator[ServerThread]:
    app = create_app(settings_for(dirs[0], tmp_path, index={"dir": dirs[0] / "index-hnsw"}))
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv


def test_reload_under_load_has_zero_failures(server: ServerThread, dirs: tuple[Path, Path]) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        old = c.get("/v1/model").json()["model_version"]
        with Hammer(server.url) as hammer:
            hammer.wait_for(100)
            r = c.post("/v1/admin/reload", json={"artifacts": str(dirs[1])}, headers=AUTH)
            swapped_at = time.monotonic()
            assert r.status_code == 200, r.text
            hammer.wait_for(100)
        body = r.json()
        new = body["model_version"]
        assert new != old and body["previous_version"] == old
        assert body["index"]["kind"] == "hnsw" and body["index"]["source"] == "built"
        assert body["index"]["recall"]["num_queries"] == 100
        assert (dirs[1] / "index-hnsw" / "index.json").is_file()
        assert c.get("/v1/model").json()["model_version"] == new
        metrics = c.get("/metrics").text
        assert f'shardrec_model_info{{index_kind="hnsw",version="{new}"}} 1.0' in metrics
        assert f'version="{old}"' not in metrics

    failures = [r for r in hammer.records if r[2] != 200]
    assert not failures, failures[:5]
    versions = [r[3] for r in hammer.records]
    assert set(versions) == {old, new}
    started_after = [r[3] for r in hammer.records if r[0] > swapped_at]
    assert started_after and set(started_after) == {new}


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index-*"))
    tables = dst / "item_tables.safetensors"
    data = bytearray(tables.read_bytes())
    data[len(data) - 100] ^= 0x01
    tables.write_bytes(bytes(data))
    return dst


def test_corrupt_or_incomplete_artifacts_are_refused_while_serving(
    server: ServerThread, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    corrupt = corrupt_copy(dirs[1], tmp_path / "corrupt")
    incomplete = Path(shutil.copytree(dirs[1], tmp_path / "incomplete"))
    (incomplete / "user_tower.safetensors").unlink()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        old = c.get("/v1/model").json()["model_version"]
        with Hammer(server.url, threads=3) as hammer:
            hammer.wait_for(30)
            r = c.post("/v1/admin/reload", json={"artifacts": str(corrupt)}, headers=AUTH)
            assert r.status_code == 422
            detail = r.json()["detail"]
            assert detail.startswith("reload refused: ")
            assert "checksum mismatch for item_tables.safetensors" in detail
            r = c.post("/v1/admin/reload", json={"artifacts": str(incomplete)}, headers=AUTH)
            assert r.status_code == 422
            assert "file user_tower.safetensors listed in the manifest is missing" in r.text
            r = c.post(
                "/v1/admin/reload", json={"artifacts": str(tmp_path / "nowhere")}, headers=AUTH
            )
            assert r.status_code == 422 and "manifest.json is missing" in r.text
            hammer.wait_for(30)
        assert not (corrupt / "index-hnsw").exists()
        assert c.get("/v1/model").json()["model_version"] == old
    assert {r[2] for r in hammer.records} == {200}
    assert {r[3] for r in hammer.records} == {old}


def test_concurrent_reload_is_refused_with_409(
    server: ServerThread, dirs: tuple[Path, Path]
) -> None:
    state = server.server.config.app.state.service
    recommender = state.recommender
    assert recommender is not None
    recommender._reload_lock.acquire()  # a reload "in progress"
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/admin/reload", json={"artifacts": str(dirs[1])}, headers=AUTH)
        assert r.status_code == 409 and "already in progress" in r.json()["detail"]
    finally:
        recommender._reload_lock.release()


def test_reload_running_in_another_process_is_refused_with_409(
    server: ServerThread, dirs: tuple[Path, Path]
) -> None:
    state = server.server.config.app.state.service
    store = state._store
    assert store.acquire_lock("reload", "another-process", 60.0)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/admin/reload", json={"artifacts": str(dirs[1])}, headers=AUTH)
        assert r.status_code == 409
        assert "already in progress in another process" in r.json()["detail"]
    finally:
        store.release_lock("reload", "another-process")
