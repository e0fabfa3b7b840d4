"""Index settings, declared once: `IndexParams` (FAISS build and search parameters, saved with
every index) and `IndexSettings` (the service's index: kind, directory, recall measurement).

``ServiceSettings.index`` is an `IndexSettings`, and the command-line flags of
``python -m service index|serve`` and the ``SHARDREC_INDEX_*`` variables are generated from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INDEX_KINDS = ("exact", "ivf", "hnsw")
IndexKind = Literal["exact", "ivf", "hnsw"]


class IndexParams(BaseModel):
    """Build and search parameters (each kind ignores the ones it does not use)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nlist: int | None = Field(
        None,
        ge=1,
        description="IVF lists; None: 4 sqrt(N), capped so that each list has at least 39 "
        "training points (FAISS's minimum).",
    )
    nprobe: int = Field(32, ge=1, description="IVF lists probed per query.")
    hnsw_m: int = Field(32, ge=2, le=256, description="HNSW graph degree M.")
    hnsw_metric: Literal["ip", "l2"] = Field(
        "ip",
        description="HNSW graph on inner products over [w, b] ('ip', best recall when item "
        "norms vary) or an L2 graph over the MIPS-to-L2 transform ('l2').",
    )
    ef_construction: int = Field(200, ge=1, description="HNSW build candidate list size.")
    ef_search: int = Field(
        128, ge=1, description="HNSW search candidate list size (FAISS uses max(ef_search, k))."
    )
    num_threads: int | None = Field(
        None, ge=1, description="FAISS OpenMP threads (process-global); None: FAISS default."
    )
    seed: int = Field(
        1234, ge=0, description="IVF k-means seed (builds repeat for a seed and thread count)."
    )

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> IndexParams:
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(
                f"nprobe must be <= nlist, got nprobe={self.nprobe} > nlist={self.nlist}; lower "
                "nprobe or raise nlist"
            )
        return self

    @classmethod
    def of(cls, value: IndexParams | Mapping[str, Any] | None) -> IndexParams:
        """The parameters of ``value``: itself, its `IndexParams` fields (of a subclass such as
        the service's index settings), a validated mapping, or the defaults for None."""
        if value is None:
            return cls()
        if type(value) is cls:
            return value
        if isinstance(value, IndexParams):
            return cls(**{name: getattr(value, name) for name in cls.model_fields})
        if isinstance(value, Mapping):
            return cls.model_validate(dict(value))
        raise TypeError(
            f"params must be an IndexParams or a mapping of its fields, got {type(value).__name__}."
        )


class IndexSettings(IndexParams):
    """The service's index (``ServiceSettings.index``): its kind and parameters, where it is
    kept, and how the recall of a newly built approximate index is measured."""

    kind: IndexKind = Field("hnsw", description="Retrieval index: exact brute force, IVF or HNSW.")
    dir: Path | None = Field(
        None, description="Where the index is saved/loaded; default <artifacts>/index-<kind>."
    )
    save: bool = Field(
        True, description="Save an index built at start-up or reload into its index directory."
    )
    recall_queries: int = Field(
        500,
        ge=0,
        le=100_000,
        description="User vectors (encoded training histories) on which the recall of a newly "
        "built approximate index is measured against exact search; 0 skips the measurement.",
    )
    recall_k: int = Field(10, ge=1, le=1000, description="k of the measured recall@k.")

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    def directory(self, artifacts: Path) -> Path:
        """``dir``, or ``<artifacts>/index-<kind>`` when it is not set."""
        return self.dir if self.dir is not None else Path(artifacts) / f"index-{self.kind}"
