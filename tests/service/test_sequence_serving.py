"""End to end with the sequence tower: train it on the synthetic default, serve it with real
uvicorn on loopback (after a hot reload from a mean-tower model), and get its recommendations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from tests.service.live import ServerThread, wait_ready
from tests.service.test_api import TOKEN, WRITE, settings_for
from tests.tiny import TINY_RUN
from trainer.artifacts import load_artifacts
from trainer.config import load_config
from trainer.pipeline import run_training

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def sequence_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seq-model")
    overrides = [*TINY_RUN, "model.tower=sequence", "batch_size=32", f"out_dir={out}"]
    return run_training(load_config("configs/synthetic.yaml", overrides))


@pytest.fixture(scope="module")
def server(artifacts_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("seq-api")
    app = create_app(settings_for(artifacts_a, tmp, index={"kind": "exact"}))
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv


def expected_top(art, history: list[str], k: int) -> list[str]:
    """The exact top-k of the artifacts' own encoder (history excluded), in NumPy."""
    rows = art.item_index()
    hist = [rows[i] for i in history][-art.encoder.max_history :]
    codes = {n: np.zeros(1, dtype=np.int64) for n in art.user_features}
    user = art.encoder.encode([hist], codes).numpy()[0].astype(np.float64)
    scores = art.output_embeddings.astype(np.float64) @ user + art.output_biases
    scores[hist] = -np.inf
    return [str(art.item_ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


def test_sequence_model_is_served_after_a_hot_reload(
    server: ServerThread, sequence_artifacts: Path
) -> None:
    art = load_artifacts(sequence_artifacts)
    assert art.model.tower == "sequence"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/admin/reload", json={"artifacts": str(sequence_artifacts)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        summary = c.get("/v1/model").json()
        assert summary["model_version"] == art.model_version
        assert summary["tower"] == "sequence" and summary["holdout"] == "test"

        history = [str(i) for i in art.item_ids[[5, 17, 3, 40, 8]]]
        r = c.post("/v1/recommend", json={"history": history, "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "model" and body["history_length"] == 5
        got = [i["item_id"] for i in body["items"]]
        assert got == expected_top(art, history, 10)

        # order matters to a sequence model (it did not to a mean of the same items)
        r = c.post("/v1/recommend", json={"history": history[::-1], "k": 10})
        assert [i["item_id"] for i in r.json()["items"]] == expected_top(art, history[::-1], 10)

        # history from the store: events, then a recommendation by user id
        r = c.post("/v1/users/seq-user/events", json={"items": history}, headers=WRITE)
        assert r.status_code == 200, r.text
        by_user = c.post("/v1/recommend", json={"user_id": "seq-user", "k": 10}).json()
        assert by_user["source"] == "model" and by_user["history_length"] == 5
        assert [i["item_id"] for i in by_user["items"]] == got
