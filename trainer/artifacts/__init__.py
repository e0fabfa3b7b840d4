"""Exported model artifacts, the contract between the trainer and the service (no data layer).

``import trainer.artifacts`` gives the reader side (:mod:`trainer.artifacts.contract`); the
writer, which needs the data layer, is ``trainer.artifacts.export.export_artifacts``.
"""

from trainer.artifacts.contract import (
    FORMAT_VERSION,
    MANIFEST,
    ArtifactError,
    Artifacts,
    Manifest,
    check_artifacts,
    load_artifacts,
    read_manifest,
    sha256_file,
    verify_artifacts,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ArtifactError",
    "Artifacts",
    "Manifest",
    "check_artifacts",
    "load_artifacts",
    "read_manifest",
    "sha256_file",
    "verify_artifacts",
    "write_manifest",
]
