"""The artifact contract as the service reads it (`trainer.artifacts`): the version-1 manifest
on disk, the typed `Manifest`, the tower rebuilt from the model part of the config alone, and
refusals that name what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.artifacts import (
    FORMAT_VERSION,
    ArtifactError,
    Manifest,
    load_artifacts,
    read_manifest,
    verify_artifacts,
)
from trainer.model import ModelConfig

# The keys of manifest.json in format version 1, in the order they are written (docs/artifacts.md).
V1_KEYS = [
    "format_version",
    "model_version",
    "created",
    "config",
    "data_fingerprint",
    "num_items",
    "num_users",
    "embedding_dim",
    "metrics",
    "files",
    "holdout",  # added within format 1 (issue 10); a manifest without it reads as "test"
]


@pytest.fixture
def model_dir(tmp_path: Path, artifacts_a: Path) -> Path:
    return Path(
        shutil.copytree(artifacts_a, tmp_path / "a", ignore=shutil.ignore_patterns("index-*"))
    )


def test_the_manifest_on_disk_is_format_1(artifacts_a: Path) -> None:
    raw = json.loads((artifacts_a / "manifest.json").read_text())
    assert list(raw) == V1_KEYS and raw["format_version"] == FORMAT_VERSION == 1
    assert sorted(raw["files"]) == sorted(
        p.name for p in artifacts_a.iterdir() if p.is_file() and p.name != "manifest.json"
    )
    manifest = verify_artifacts(artifacts_a)
    assert isinstance(manifest, Manifest)
    assert manifest.model_dump() == raw  # nothing lost or added on the way in
    assert manifest["metrics"] == manifest.metrics == raw["metrics"]  # reads like the document
    assert manifest.get("no-such-key", "default") == "default"
    older = {k: v for k, v in raw.items() if k != "holdout"}  # written before the key existed
    assert Manifest.model_validate(older).holdout == "test"


def test_the_tower_comes_from_the_model_part_of_the_config(artifacts_a: Path) -> None:
    art = load_artifacts(artifacts_a)
    assert art.model == ModelConfig(embedding_dim=16, hidden=[32])
    assert art.model_version == art.manifest.model_version
    assert art.encoder.encode([[0, 1, 2]]).shape == (1, 16)
    assert art.config.model == art.model  # the full training config, on the training side


def test_a_manifest_that_does_not_fit_is_refused_by_name(model_dir: Path) -> None:
    path = model_dir / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(ArtifactError, match="format_version 2 is not supported"):
        read_manifest(model_dir)
    del raw["files"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="does not fit format 1: files: Field required"):
        read_manifest(model_dir)
    path.write_text(json.dumps({**raw, "files": {}, "added_later": 1}))  # unknown keys are kept
    assert read_manifest(model_dir)["added_later"] == 1
    path.write_text(json.dumps({**raw, "files": {}, "config": {"name": "x"}}))
    with pytest.raises(ArtifactError, match=r"cannot load artifacts \(KeyError: 'model'\)"):
        load_artifacts(model_dir)
