"""The artifact contract: the manifest, its checksums, and the verified reader both sides use.

One directory per trained model (format described in docs/artifacts.md)::

    manifest.json              format version, model version, config, metrics, sha256 of files
    items.csv                  index, original_id, title, popularity
    users.csv                  original_id and categorical feature codes of each user
    histories.csv              user_id, item_id, timestamp of every interaction (original ids)
    item_tables.safetensors    output_embeddings [N, D], output_biases [N], input_embeddings
    user_tower.safetensors     the user tower's weights (no pickle)
    features.json              vocabularies of the user features and item side features
    curves.csv, curves.png     training loss and validation metrics per epoch

Everything loads without pickle; :func:`load_artifacts` verifies every checksum. This module
imports neither the data layer (pyarrow) nor Ray nor the training config: the reader rebuilds
the tower from the model part of the saved config alone, so the service loads artifacts with
it. The trainer writes the files with `trainer.artifacts.export` and the manifest with
:func:`write_manifest`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file

from trainer.model import ModelConfig, UserEncoder
from trainer.sequence import build_user_tower

if TYPE_CHECKING:
    from trainer.config import TrainConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory that is missing files, corrupt, or of an unsupported format."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Manifest(BaseModel):
    """``manifest.json`` (fields in the order they are written; unknown keys are kept).

    It also reads like the JSON document it is: ``manifest["metrics"]``,
    ``manifest.get("data_fingerprint")``.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int
    model_version: str  # <config name>-<UTC time>-<hash of the file checksums>
    created: str  # ISO 8601, UTC
    config: dict[str, Any]  # the full training config, as JSON data
    data_fingerprint: str
    num_items: int
    num_users: int
    embedding_dim: int
    metrics: dict[str, Any]
    files: dict[str, str]  # file name -> sha256 of every other file
    holdout: str = "test"  # data.holdout: what was held out of training (test, valid, none)

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {})[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def write_manifest(
    directory: Path,
    name: str,
    config: dict[str, Any],
    *,
    data_fingerprint: str,
    num_items: int,
    num_users: int,
    embedding_dim: int,
    metrics: dict[str, Any],
    holdout: str = "test",
) -> Manifest:
    """Checksum every file of ``directory`` and write its manifest (the last file written).

    Returns:
        The manifest; its ``model_version`` is ``<name>-<UTC time>-<hash of the checksums>``.
    """
    created = datetime.now(timezone.utc)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:10]
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_version=f"{name}-{created.strftime('%Y%m%dT%H%M%SZ')}-{digest}",
        created=created.isoformat(),
        config=config,
        data_fingerprint=data_fingerprint,
        num_items=num_items,
        num_users=num_users,
        embedding_dim=embedding_dim,
        metrics=metrics,
        files=files,
        holdout=holdout,
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2, default=str))
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the artifact directory ``path`` (format checked, checksums not).

    Raises:
        ArtifactError: no manifest, not JSON, an unsupported format version or missing fields.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{path} is not an artifact directory: {MANIFEST} is missing.")
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON: {e}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format_version {version!r} is not supported (expected "
            f"{FORMAT_VERSION}); re-export it with this version of shardrec."
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ArtifactError(f"{mpath} does not fit format {FORMAT_VERSION}: {problems}.") from None


def verify_artifacts(path: str | Path) -> Manifest:
    """Check the manifest's format and every file's sha256; return the manifest.

    Raises:
        ArtifactError: what is wrong and with which file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest.files.items():
        fpath = path / name
        if not fpath.exists():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing.")
        got = sha256_file(fpath)
        if got != expected:
            raise ArtifactError(
                f"{path}: checksum mismatch for {name} (manifest {expected[:12]}..., file "
                f"{got[:12]}...): the artifact is corrupt or was modified."
            )
    return manifest


@dataclass
class Artifacts:
    """A loaded artifact directory (CPU tensors, numpy tables)."""

    path: Path
    manifest: Manifest
    model: ModelConfig  # the model part of the saved config: what the tower was built from
    item_ids: np.ndarray  # [N] original ids as strings
    titles: list[str]
    popularity: np.ndarray  # [N] int64
    output_embeddings: np.ndarray  # [N, D] float32
    output_biases: np.ndarray  # [N] float32
    encoder: UserEncoder
    user_ids: np.ndarray  # [U] original ids as strings
    user_features: dict[str, np.ndarray]  # name -> [U] codes
    feature_vocab: dict

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def config(self) -> TrainConfig:
        """The full training config (training side only: it imports the data layer)."""
        from trainer.config import TrainConfig

        return TrainConfig.model_validate(self.manifest.config)

    def item_index(self) -> dict[str, int]:
        """Original item id (as a string) -> internal index."""
        return {s: i for i, s in enumerate(self.item_ids)}

    def histories(self) -> Iterator[tuple[str, str, int]]:
        """Iterate ``(user_id, item_id, timestamp)`` rows of histories.csv (original ids)."""
        with open(self.path / "histories.csv", encoding="utf-8") as f:
            r = csv.reader(f)
            next(r)
            for user, item, ts in r:
                yield user, item, int(ts)


def load_artifacts(path: str | Path, verify: bool = True) -> Artifacts:
    """Load (and by default verify) an artifact directory written by the trainer's export."""
    path = Path(path)
    manifest = verify_artifacts(path) if verify else read_manifest(path)
    try:
        model = ModelConfig.model_validate(manifest.config["model"])
        tables = load_file(str(path / "item_tables.safetensors"))
        tower_state = load_file(str(path / "user_tower.safetensors"))
        feats = json.loads((path / "features.json").read_text())
        item_ids, titles, pop = _read_items(path / "items.csv")
        users, codes = _read_users(path / "users.csv", sorted(feats["user_features"]))
    except (KeyError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot load artifacts ({type(e).__name__}: {e}).") from None
    sizes = {n: len(v) for n, v in feats["user_features"].items()}
    tower = build_user_tower(
        model,
        sizes,
        tower_state.get("item_features"),
        len(feats["item_feature_vocab"]),
        max_history=feats["max_history"],
    )
    try:
        tower.load_state_dict(tower_state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: user tower weights do not fit the config: {e}") from None
    encoder = UserEncoder(tower, tables["input_embeddings"], feats["max_history"])
    return Artifacts(
        path=path,
        manifest=manifest,
        model=model,
        item_ids=np.asarray(item_ids, dtype=object),
        titles=titles,
        popularity=np.asarray(pop, dtype=np.int64),
        output_embeddings=tables["output_embeddings"].numpy(),
        output_biases=tables["output_biases"].numpy(),
        encoder=encoder,
        user_ids=np.asarray(users, dtype=object),
        user_features={n: np.asarray(v, dtype=np.int64) for n, v in codes.items()},
        feature_vocab=feats,
    )


def _read_items(path: Path) -> tuple[list[str], list[str], list[int]]:
    item_ids, titles, pop = [], [], []
    with open(path, encoding="utf-8") as f:
        r = csv.reader(f)
        next(r)
        for _, oid, title, p in r:
            item_ids.append(oid)
            titles.append(title)
            pop.append(int(p))
    return item_ids, titles, pop


def _read_users(path: Path, names: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    users, codes = [], {n: [] for n in names}
    with open(path, encoding="utf-8") as f:
        r = csv.reader(f)
        header = next(r)
        for row in r:
            users.append(row[0])
            for n, v in zip(header[1:], row[1:]):
                codes[n].append(int(v))
    return users, codes


def check_artifacts(artifacts: Artifacts) -> None:
    """Shape checks across the artifact files (beyond the checksums).

    Raises:
        ArtifactError: naming the inconsistent tables.
    """
    emb = np.asarray(artifacts.output_embeddings)
    bias = np.asarray(artifacts.output_biases)
    n = len(artifacts.item_ids)
    if emb.ndim != 2 or emb.shape[0] != n or bias.shape != (n,) or len(artifacts.popularity) != n:
        raise ArtifactError(
            f"{artifacts.path}: item tables do not fit the catalogue: {n} items in items.csv, "
            f"output_embeddings {emb.shape}, output_biases {bias.shape}, popularity "
            f"{len(artifacts.popularity)}; re-export the artifacts."
        )
    if n == 0:
        raise ArtifactError(f"{artifacts.path}: the catalogue is empty; nothing to serve.")
    probe = artifacts.encoder.encode([[0]], None)
    if tuple(probe.shape) != (1, emb.shape[1]):
        raise ArtifactError(
            f"{artifacts.path}: the user tower outputs vectors of shape {tuple(probe.shape)[1:]}, "
            f"the output embeddings have dim {emb.shape[1]}; the tower and the item tables come "
            "from different models."
        )
    if not np.isfinite(emb).all() or not np.isfinite(bias).all():
        raise ArtifactError(f"{artifacts.path}: the item tables hold NaN or inf values.")
