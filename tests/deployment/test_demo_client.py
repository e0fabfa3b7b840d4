"""`demo.client.serve_and_query` (``make demo``) against a tiny trained model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from demo import client as demo_client
from tests.procs import pids_naming
from tests.tiny import TINY_RUN

pytestmark = pytest.mark.slow

TINY = TINY_RUN


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    from trainer.config import load_config
    from trainer.pipeline import run_training

    out = tmp_path_factory.mktemp("demo-run")
    return run_training(load_config(None, [*TINY, f"out_dir={out}"]))


def no_server_left(artifacts: Path) -> bool:
    return not pids_naming(f"--artifacts\0{artifacts}")


def test_serve_and_query_shows_the_api_and_stops_the_server(artifacts):
    out = io.StringIO()
    assert demo_client.serve_and_query(artifacts, out=out) == 0, out.getvalue()
    text = out.getvalue()
    for expected in (
        "== starting the API on http://127.0.0.1:",
        "ready: model ",
        "300 items, 600 users",
        "top-10 (model,",
        "items most similar to the most popular item",
        "watches 3 items like it",
        "fresh top-10",
        "change",
        "== done; the API server was stopped",
    ):
        assert expected in text, text
    assert text.count("\n     1  ") == 3, text  # three ranked tables
    assert no_server_left(artifacts)


def test_interrupt_stops_the_server(artifacts, monkeypatch):
    def interrupted(api, artifacts, out):
        assert api.call("GET", "/healthz") == {"status": "ok"}  # the server was up
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_client, "demo", interrupted)
    out = io.StringIO()
    assert demo_client.serve_and_query(artifacts, out=out) == 130
    assert "interrupted; the API server was stopped" in out.getvalue()
    assert no_server_left(artifacts)


def test_a_server_that_cannot_start_is_reported(tmp_path):
    empty = tmp_path / "artifacts"
    empty.mkdir()
    out = io.StringIO()
    assert demo_client.serve_and_query(empty, out=out, timeout=60) == 1
    text = out.getvalue()
    assert "demo failed" in text, text
    assert no_server_left(empty)
