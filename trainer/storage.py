"""Where a run's checkpoints and artifacts live: a local path or a URI, through ``pyarrow.fs``.

A :class:`StoragePath` is a small pathlib-like handle on a file or directory of any filesystem
``pyarrow.fs.FileSystem.from_uri`` knows, as Ray Train's ``storage_path`` is::

    /mnt/runs/exp1                                 a local (or mounted, shared) directory
    s3://bucket/runs/exp1                          S3; credentials from the standard AWS
                                                   variables (AWS_ACCESS_KEY_ID, ...) or
    s3://bucket/exp1?endpoint_override=http://127.0.0.1:9000&region=us-east-1
                                                   pyarrow's S3 options in the query
    gs://bucket/exp1, hdfs://namenode/exp1         the other pyarrow filesystems

Every node's processes open the same location by its URI (a handle pickles as its URI), so no
shared filesystem is needed: each shard writes its own files, worker 0 the run state, and the
driver the artifacts. Writes are atomic for readers: local files are written to a temporary
sibling, fsynced and renamed; an object store makes an object visible only once its upload is
complete. A rename on an object store (:meth:`StoragePath.replace`) is a copy then a delete,
which the two-slot checkpoint files (:mod:`trainer.shards.slots`) tolerate.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import torch

from trainer.embeddings import atomic_torch_save, atomic_write

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _filesystem(base: str) -> pafs.FileSystem:
    """One filesystem object per ``scheme://bucket?query`` (an S3 client is costly to make)."""
    return pafs.FileSystem.from_uri(base)[0]


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a filesystem by scheme (``s3://...``) rather than a path."""
    return "://" in str(location) and not str(location).startswith("file://")


class StoragePath:
    """A file or directory in a ``pyarrow.fs`` filesystem (see the module docstring).

    Build one with :meth:`of`; ``/``, ``name``, ``parent``, ``exists``, ``unlink``,
    ``read_bytes``, ``write_text`` ... behave as on :class:`pathlib.Path`. A local one is also
    an ``os.PathLike``.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "", query: str = "") -> None:
        self.fs, self.path, self.scheme, self.query = fs, path, scheme, query

    @classmethod
    def of(cls, location: str | os.PathLike | StoragePath) -> StoragePath:
        """A handle on ``location``: a path (relative: to the working directory) or a URI.

        Raises:
            ValueError: for a URI that pyarrow cannot open, saying what it answered.
        """
        if isinstance(location, StoragePath):
            return location
        text = os.fspath(location) if not isinstance(location, str) else location
        if text.startswith("file://"):
            text = urlsplit(text).path
        if not is_uri(text):
            return cls(_local(), os.path.abspath(os.path.expanduser(text)))
        parts = urlsplit(text)
        base = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
        try:
            fs = _filesystem(base)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... by filesystem
            raise ValueError(
                f"cannot open the storage location {redact(text)!r}: {e}. Expected a local path "
                f"or a URI pyarrow.fs knows (s3://bucket/prefix, gs://bucket/prefix, "
                f"hdfs://host/path); for S3 set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                f"(and AWS_ENDPOINT_URL or ?endpoint_override=... for a non-AWS server)."
            ) from e
        path = (parts.netloc + parts.path).rstrip("/")
        return cls(fs, path, parts.scheme, parts.query)

    # --- names ------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return not self.scheme

    def uri(self) -> str:
        """The full location, options included: what another process opens with :meth:`of`."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:  # for messages: without the query (it may hold a secret key)
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and self.uri() == other.uri()

    def __hash__(self) -> int:
        return hash(self.uri())

    def __reduce__(self):
        return (StoragePath.of, (self.uri(),))

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is not a local path; read it with read_bytes/load_torch.")
        return self.path

    def __truediv__(self, part: str) -> StoragePath:
        return StoragePath(self.fs, posixpath.join(self.path, str(part)), self.scheme, self.query)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.fs, posixpath.dirname(self.path), self.scheme, self.query)

    def with_name(self, name: str) -> StoragePath:
        return self.parent / name

    # --- queries ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def files(self) -> list[str]:
        """Every file below this directory, as paths relative to it (sorted; [] if none)."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        root = self.path.rstrip("/") + "/"
        return sorted(i.path[len(root) :] for i in infos if i.type == pafs.FileType.File)

    # --- changes ----------------------------------------------------------------------------
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Create the directory (an object store has none: nothing to do there)."""
        if self.is_local:
            Path(self.path).mkdir(parents=parents, exist_ok=exist_ok)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete this directory and everything below it (nothing if it is not there)."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def replace(self, target: StoragePath) -> None:
        """Move this file to ``target`` (atomic locally; a copy and a delete on object stores)."""
        if self.is_local:
            os.replace(self.path, target.path)
        else:
            self.fs.move(self.path, target.path)

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` so that readers see the old file or the whole new one."""
        if self.is_local:
            atomic_write(Path(self.path), lambda f: f.write(data))
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    # --- torch files ------------------------------------------------------------------------
    def save_torch(self, obj: object) -> None:
        """``torch.save`` atomically (see :meth:`write_bytes`)."""
        if self.is_local:
            atomic_torch_save(obj, Path(self.path))
            return
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(buf.getvalue())

    def load_torch(self, mmap: bool = False):
        """``torch.load(weights_only=True)``; ``mmap`` maps a local file (remote: read whole)."""
        if self.is_local:
            return torch.load(self.path, weights_only=True, mmap=mmap)
        return torch.load(io.BytesIO(self.read_bytes()), weights_only=True)

    # --- directories ------------------------------------------------------------------------
    def upload(self, local_dir: str | os.PathLike) -> None:
        """Copy the local directory ``local_dir`` here (file by file; this one first removed)."""
        self.rmtree()
        self.mkdir()
        pafs.copy_files(
            os.fspath(local_dir),
            self.path,
            source_filesystem=_local(),
            destination_filesystem=self.fs,
        )

    def download(self, local_dir: str | os.PathLike) -> Path:
        """Copy this directory to the local ``local_dir``; returns it."""
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path,
            os.fspath(local_dir),
            source_filesystem=self.fs,
            destination_filesystem=_local(),
        )
        return Path(local_dir)


@functools.lru_cache(maxsize=1)
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def redact(text: str) -> str:
    """``text`` without a URI's query (pyarrow's S3 options may carry a secret key)."""
    return text.split("?", 1)[0]


def run_storage(cfg) -> StoragePath:
    """Where the run of ``cfg`` (a :class:`~trainer.config.TrainConfig`) keeps its checkpoints
    and artifacts: ``cfg.storage`` if set, else ``cfg.out_dir``."""
    return StoragePath.of(cfg.storage if cfg.storage else cfg.out_dir)


def publish_artifacts(local_dir: str | os.PathLike, target: str | StoragePath) -> StoragePath:
    """Upload the artifact directory ``local_dir`` to ``target`` and verify the copy: it is
    read back into a temporary directory and every file checked against the manifest's sha256
    (:func:`trainer.artifacts.contract.verify_artifacts`). Returns ``target``.

    Raises:
        trainer.artifacts.contract.ArtifactError: the copy differs from what was written.
    """
    target = StoragePath.of(target)
    target.upload(local_dir)
    fetch_artifacts(target)
    logger.info("artifacts uploaded to %s and verified", target)
    return target


def fetch_artifacts(source: str | StoragePath, local_dir: str | os.PathLike | None = None) -> Path:
    """Download the artifact directory at ``source`` into ``local_dir`` (a new temporary
    directory when None) and verify it; returns the local directory."""
    from trainer.artifacts.contract import verify_artifacts

    source = StoragePath.of(source)
    if source.is_local and local_dir is None:
        verify_artifacts(source.path)
        return Path(source.path)
    if local_dir is None:
        local_dir = tempfile.mkdtemp(prefix="shardrec-artifacts-")
    source.download(local_dir)
    verify_artifacts(local_dir)
    return Path(local_dir)
