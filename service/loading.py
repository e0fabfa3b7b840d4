"""Loading a `Model` from an artifact directory: verify the artifacts, load or build the index.

`load_model` verifies every checksum (`trainer.artifacts`), then loads the saved index or builds
one, measuring the recall of an approximate index against exact search on the model's own user
vectors, and saves it with that recall.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from service.index import (
    IndexSettings,
    ItemIndex,
    RecallReport,
    build_index,
    load_index,
    measure_recall,
    save_index,
)
from service.index.persistence import META_FILE
from service.model import IndexInfo, Model
from trainer.artifacts import Artifacts, check_artifacts, load_artifacts

logger = logging.getLogger(__name__)

_ENCODE_CHUNK = 256


def load_model(path: str | Path, index: IndexSettings | None = None) -> Model:
    """Load and verify the artifacts at ``path`` and load or build their index.

    Args:
        path: an artifact directory written by ``trainer.artifacts.export.export_artifacts``.
        index: the index kind, parameters, directory (default ``<path>/index-<kind>``), whether
            a newly built one is saved, and its recall measurement (defaults of
            `IndexSettings` when None).

    Raises:
        ArtifactError: a missing, corrupt or inconsistent artifact directory (checksums are
            verified); nothing is served from it.
    """
    start = time.perf_counter()
    path = Path(path)
    settings = index if index is not None else IndexSettings()
    artifacts = load_artifacts(path)
    check_artifacts(artifacts)
    item_index, info = load_or_build_index(artifacts, settings, settings.directory(path))
    model = Model(artifacts, item_index, info)
    logger.info(
        "loaded model %s (%d items, dim %d, %s index) from %s in %.2fs",
        model.model_version,
        model.num_items,
        model.dim,
        item_index.kind,
        path,
        time.perf_counter() - start,
    )
    return model


def load_or_build_index(
    artifacts: Artifacts, settings: IndexSettings, index_dir: Path
) -> tuple[ItemIndex, IndexInfo]:
    """The saved index in ``index_dir`` when it is of ``settings.kind`` and holds exactly these
    items, else a new one (recall measured, saved when ``settings.save``)."""
    start = time.perf_counter()
    kind = settings.kind
    vectors, bias = artifacts.output_embeddings, artifacts.output_biases
    if (index_dir / META_FILE).is_file():
        try:
            index, recall = load_index(index_dir, settings, kind=kind)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            logger.warning("cannot use the saved index in %s (%s); rebuilding it", index_dir, e)
        else:
            if index.matches(vectors, bias):
                seconds = time.perf_counter() - start
                info = IndexInfo(
                    kind, index.params.model_dump(), "loaded", str(index_dir), recall, seconds
                )
                return index, info
            logger.warning(
                "the saved index in %s is a %s index of other item vectors; rebuilding it",
                index_dir,
                index.kind,
            )
    index = build_index(kind, vectors, bias, settings)
    recall = None
    if index.is_exact:
        recall = RecallReport(recall=1.0, k=settings.recall_k, num_queries=0)
    elif settings.recall_queries > 0:
        queries = training_user_vectors(artifacts, settings.recall_queries)
        if len(queries):
            exact = build_index("exact", vectors, bias)
            recall = measure_recall(index, exact, queries, settings.recall_k)
    seconds = time.perf_counter() - start
    saved: str | None = None
    if settings.save:
        try:
            saved = str(save_index(index, index_dir, recall))
        except OSError as e:
            logger.warning("could not save the %s index to %s: %s", kind, index_dir, e)
    return index, IndexInfo(kind, index.params.model_dump(), "built", saved, recall, seconds)


def training_user_vectors(artifacts: Artifacts, max_users: int) -> np.ndarray:
    """User vectors float32 ``[n, D]`` of the first ``max_users`` users of the training histories
    (each user's full history, features from the artifacts)."""
    item_row = artifacts.item_index()
    histories: dict[str, list[int]] = {}
    for user, item, _ in artifacts.histories():
        if user not in histories:
            if len(histories) >= max_users:
                break
            histories[user] = []
        row = item_row.get(item)
        if row is not None:
            histories[user].append(row)
    users = [u for u, h in histories.items() if h]
    if not users:
        return np.empty((0, artifacts.output_embeddings.shape[1]), dtype=np.float32)
    user_row = {str(u): r for r, u in enumerate(artifacts.user_ids)}
    out = []
    for start in range(0, len(users), _ENCODE_CHUNK):
        chunk = users[start : start + _ENCODE_CHUNK]
        rows = [user_row.get(u) for u in chunk]
        codes = {
            name: np.array([values[r] if r is not None else 0 for r in rows], dtype=np.int64)
            for name, values in artifacts.user_features.items()
        }
        vectors = artifacts.encoder.encode([histories[u] for u in chunk], codes)
        out.append(vectors.numpy().astype(np.float32))
    return np.concatenate(out)
