"""Saving and loading an index directory: ``index.faiss`` (FAISS's own format) and
``index.json`` (kind, parameters, fingerprint of the items, the recall measured at build).

A directory is written next to its target under a temporary name and then renamed, so a reader
never sees a half-written index; a load checks the stored vectors against the fingerprint, so a
corrupted or mismatched ``index.faiss`` fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss

from service.index.backends import set_num_threads
from service.index.item_index import ItemIndex
from service.index.params import IndexParams
from service.index.recall import RecallReport

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1
_BUILD_TIME = ("nlist", "hnsw_m", "hnsw_metric", "ef_construction", "seed")
_SEARCH_TIME = ("nprobe", "ef_search", "num_threads")


def save_index(
    index: ItemIndex, path: str | os.PathLike[str], recall: RecallReport | None = None
) -> Path:
    """Write ``index`` (and the ``recall`` measured for it) to directory ``path``.

    An existing directory at ``path`` is replaced. Returns the directory path.
    """
    if index.backend.faiss is None:
        raise ValueError(
            f"cannot save an empty {index.kind} index; call build(item_vectors, item_bias) first."
        )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        faiss.write_index(index.backend.faiss, str(tmp / INDEX_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": index.kind,
            "is_exact": index.is_exact,
            "dim": index.dim,
            "ntotal": index.ntotal,
            "params": index.params.model_dump(),
            "fingerprint": index.fingerprint,
            "recall": recall._asdict() if recall is not None else None,
            "faiss_version": faiss.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **index.backend.meta(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s index (%d items) to %s", index.kind, index.ntotal, target)
    return target


def load_index(
    path: str | os.PathLike[str], params: IndexParams | None = None, kind: str | None = None
) -> tuple[ItemIndex, RecallReport | None]:
    """Load a directory written by `save_index`: ``(index, recall saved with it)``.

    Args:
        params: replaces the saved parameters; only the search-time ones take effect
            (``nprobe``, ``ef_search``, ``num_threads``), build-time ones need a rebuild.
        kind: the kind the directory must hold (None: any).
    """
    directory = Path(path)
    meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
    if not meta_path.is_file() or not index_path.is_file():
        raise FileNotFoundError(
            f"expected an index directory with {META_FILE} and {INDEX_FILE}, got {directory} "
            f"(exists: {directory.exists()}); build it first with "
            "save_index(build_index(...), path)."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')!r}, expected "
            f"{FORMAT_VERSION}; rebuild the index with this version of shardrec."
        )
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(
            f"{path} holds a {meta.get('kind')!r} index, expected {kind!r}; load it without "
            f"kind= or rebuild it with build_index({kind!r}, ...)."
        )
    params = _loaded_params(IndexParams.model_validate(meta["params"]), params)
    set_num_threads(params.num_threads)
    index = ItemIndex(meta.get("kind"), int(meta["dim"]), params)
    faiss_index = faiss.read_index(str(index_path))
    expected_width = index.backend.width
    if faiss_index.d != expected_width or faiss_index.ntotal != meta["ntotal"]:
        raise ValueError(
            f"{index_path} holds {faiss_index.ntotal} vectors of width {faiss_index.d}, expected "
            f"{meta['ntotal']} of width {expected_width} from {meta_path}; rebuild the index."
        )
    index.restore(faiss_index, meta)
    if index.fingerprint != meta["fingerprint"]:
        raise ValueError(
            f"the vectors in {index_path} do not match the fingerprint in {meta_path}; the "
            "directory is corrupted or mixed from two builds: rebuild the index."
        )
    recall = RecallReport(**meta["recall"]) if meta.get("recall") else None
    logger.info("loaded %s index (%d items) from %s", index.kind, index.ntotal, directory)
    return index, recall


def _loaded_params(saved: IndexParams, given: IndexParams | None) -> IndexParams:
    """The saved parameters with the search-time ones of ``given`` (when given)."""
    if given is None:
        return saved
    given = IndexParams.of(given)
    changed = [n for n in _BUILD_TIME if getattr(given, n) != getattr(saved, n)]
    if changed:
        logger.warning(
            "build-time parameters %s differ from the saved index and are ignored; rebuild "
            "the index to change them",
            changed,
        )
    update: dict[str, Any] = {n: getattr(given, n) for n in _SEARCH_TIME}
    return saved.model_copy(update=update)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` (near-atomically)."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
