"""``python -m service index`` / ``serve``: build + recall + save, and fail-fast errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from service.cli import main, settings_environment
from service.index import IndexSettings
from service.loading import load_model
from service.settings import ServiceSettings
from tests.service.live import run_python


@pytest.fixture
def model_dir(tmp_path: Path, artifacts_a: Path) -> Path:
    return Path(
        shutil.copytree(artifacts_a, tmp_path / "a", ignore=shutil.ignore_patterns("index-*"))
    )


def test_index_builds_measures_and_saves(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "index",
            "--artifacts",
            str(model_dir),
            "--kind",
            "ivf",
            "--nlist",
            "4",
            "--nprobe",
            "2",
            "--recall-queries",
            "100",
            "--recall-k",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ivf index of 300 items (dim 16)" in out and "'nlist': 4" in out and "'nprobe': 2" in out
    assert "recall@5 = " in out and "on 100 user vectors" in out
    meta = json.loads((model_dir / "index-ivf" / "index.json").read_text())
    assert meta["recall"]["k"] == 5 and meta["recall"]["num_queries"] == 100
    assert f"recall@5 = {meta['recall']['recall']:.4f}" in out
    # The service, with the same flags, loads the saved index (nlist was fixed at build time).
    model = load_model(model_dir, IndexSettings(kind="ivf", nprobe=2))
    assert model.index_info.source == "loaded" and model.index.backend.nprobe == 2
    assert model.index.backend.nlist == 4 and model.index.params.nlist == 4


def test_index_hnsw_as_a_subprocess(model_dir: Path) -> None:
    done = run_python(
        [
            "-m",
            "service",
            "index",
            "--artifacts",
            str(model_dir),
            "--kind",
            "hnsw",
            "--m",
            "8",
            "--ef-construction",
            "40",
            "--ef-search",
            "32",
        ],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "hnsw index of 300 items" in done.stdout and "'hnsw_m': 8" in done.stdout
    assert (model_dir / "index-hnsw" / "index.faiss").is_file()


def test_index_refuses_corrupt_artifacts(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (model_dir / "items.csv").write_text("index,original_id,title,popularity\n")
    assert main(["index", "--artifacts", str(model_dir)]) == 2
    assert "checksum mismatch for items.csv" in capsys.readouterr().err
    assert main(["index", "--artifacts", str(model_dir), "--m", "1"]) == 2
    assert "index.hnsw_m: Input should be greater than or equal to 2" in capsys.readouterr().err


def test_serve_fails_fast_on_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHARDREC_ARTIFACTS", raising=False)
    assert main(["serve", "--artifacts", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "invalid settings: artifacts:" in err and "does not exist" in err
    monkeypatch.setenv("SHARDREC_ADMIN_TOKEN", "short")
    assert main(["serve", "--artifacts", str(tmp_path)]) == 2
    assert "admin_token must be at least 16 characters" in capsys.readouterr().err


def test_serve_needs_a_worker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--artifacts", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_flags_are_generated_from_the_settings(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--index.ef-search int, --ef-search int", "--index.hnsw-m int, --m int"):
        assert flag in text, text
    assert "--max-k int" in text and "SHARDREC_INDEX_EF_SEARCH" in text
    assert "--no-access-log" in text and "--index-dir" in text
    flags = text.split("options:", 1)[1]
    assert "--admin-token" not in flags and not re.search(r"(?<![-\w])-m\b", flags)  # no `-m`
    assert "--api-keys" not in flags and "--redis-url" not in flags  # credentials: env only
    assert "--store {sqlite,redis}" in text and "--cors-origins" in text
    with pytest.raises(SystemExit) as exit_info:  # never a flag: it would show in `ps`
        main(["serve", "--artifacts", ".", "--admin-token", "x" * 20])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --admin-token" in capsys.readouterr().err


def test_worker_processes_rebuild_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --workers N`` hands its settings to the workers through the environment."""
    settings = ServiceSettings.from_mapping(
        {
            "artifacts": tmp_path,
            "port": 9001,
            "access_log": False,
            "index": {"kind": "ivf", "nlist": 8, "nprobe": 4, "save": False},
            "store": "redis",
            "cors_origins": ["https://a.example", "https://b.example"],
            "reload_poll_s": 0.25,
        }
    )
    for name in list(os.environ):
        if name.startswith("SHARDREC_"):
            monkeypatch.delenv(name)
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)
    assert ServiceSettings() == settings
