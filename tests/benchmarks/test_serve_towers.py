"""benchmarks.serve --only-towers: two real servers (the mean and the sequence tower) on one
saved index, its table; and the pieces it is made of."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from benchmarks.serve import REPO
from benchmarks.serve.towers import history_requests, share_index


def test_history_requests_are_distinct_catalogue_items():
    items = [f"i{n}" for n in range(80)]
    reqs = history_requests(items, 50, 7, 8000, 3, seed=1)
    bodies = [json.loads(r.split(b"\r\n\r\n", 1)[1]) for r in reqs]
    for r, body in zip(reqs, bodies, strict=True):
        assert r.startswith(b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", r).group(1))
        assert length == len(r.split(b"\r\n\r\n", 1)[1])
        assert body["k"] == 7 and len(set(body["history"])) == 50
        assert set(body["history"]) <= set(items)
    assert bodies[0] != bodies[1]
    assert history_requests(items, 50, 7, 8000, 3, seed=1) == reqs  # seeded


def test_share_index_needs_a_saved_index(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="expected a saved index"):
        share_index(tmp_path / "a", tmp_path / "b")
    (tmp_path / "a" / "index-hnsw").mkdir()
    (tmp_path / "a" / "index-hnsw" / "index.json").write_text("{}")
    (tmp_path / "b" / "index-hnsw").mkdir()
    (tmp_path / "b" / "index-hnsw" / "stale").write_text("old")
    assert share_index(tmp_path / "a", tmp_path / "b") == ["index-hnsw"]
    assert sorted(p.name for p in (tmp_path / "b" / "index-hnsw").iterdir()) == ["index.json"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_only_towers_measures_both_towers_on_one_index(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.serve",
            "--num-items",
            "2000",
            "--num-users",
            "200",
            "--duration",
            "1",
            "--connections",
            "4",
            "--only-towers",
            "--skip-sweep",
            "--work-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if re.match(r"\| (mean|sequence) ", line)]
    assert len(rows) == 4, run.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2].replace(",", "")) > 0  # req/s
        if cells[0] == "mean":
            assert cells[-1] == "1"
    mean = tmp_path / "artifacts-2000-d64-s0"
    seq = tmp_path / "artifacts-2000-d64-s0-sequence"
    manifest = json.loads((seq / "manifest.json").read_text())
    assert manifest["config"]["model"]["tower"] == "sequence"
    # the sequence server loaded the copied index: not rebuilt (a rebuild rewrites index.json)
    meta = [json.loads((d / "index-hnsw" / "index.json").read_text()) for d in (mean, seq)]
    assert meta[0] == meta[1]
