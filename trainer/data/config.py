"""Configuration of the training data: where interactions come from and how they are split.

``DataConfig`` picks a source (synthetic, MovieLens 100K / 1M, or an interactions file) and is
validated when it is built (a source's required field must be set); whether the files exist is
checked by ``load_dataset``, so a config stays portable to machines without the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Source = Literal["synthetic", "movielens-100k", "movielens-1m", "interactions"]
Holdout = Literal["test", "valid", "none"]


class SyntheticConfig(BaseModel):
    """A generated catalogue with Zipf popularity and users with a drifting latent taste.

    Each user has a unit taste vector and each item a unit vector, both ``dim``-dimensional.
    For every event the generator draws ``candidate_pool`` items by (Zipf) popularity and the
    user picks one of them with probability ``softmax(taste . item / temperature)``; the taste
    then moves towards the chosen item by ``drift``. Items among the user's last
    ``repeat_window`` picks are left out of the pool (0 allows immediate repeats). Sequence
    lengths are ``min_sequence_length`` plus a geometric number with mean
    ``mean_sequence_length - min_sequence_length``, capped at ``max_sequence_length``.
    Cost is O(events * candidate_pool * (dim + repeat_window)) time and
    O(num_items * dim + events) memory.
    """

    model_config = ConfigDict(extra="forbid")

    num_users: int = Field(2000, ge=1)
    num_items: int = Field(3000, ge=2)
    dim: int = Field(16, ge=1, description="latent taste dimension")
    zipf_exponent: float = Field(1.0, gt=0.0, description="popularity of rank r is ~ (r+1)^-s")
    mean_sequence_length: float = Field(30.0, ge=5.0)
    min_sequence_length: int = Field(5, ge=2)
    max_sequence_length: int = Field(1000, ge=2)
    candidate_pool: int = Field(32, ge=1, description="items drawn by popularity per event")
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature of the taste choice")
    drift: float = Field(0.1, ge=0.0, le=1.0, description="taste step towards a chosen item")
    repeat_window: int = Field(
        50, ge=0, description="a user never re-picks one of its last repeat_window items"
    )
    num_genres: int = Field(18, ge=1, description="item feature tokens (genres)")
    num_segments: int = Field(8, ge=1, description="values of the informative user feature")
    start_timestamp: int = Field(1_600_000_000, ge=0, description="seconds since the epoch")
    start_spread_seconds: int = Field(180 * 86_400, ge=0, description="users start uniformly")
    mean_gap_seconds: float = Field(3_600.0, gt=0.0, description="mean time between events")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_lengths(self) -> SyntheticConfig:
        if self.mean_sequence_length < self.min_sequence_length:
            raise ValueError(
                f"mean_sequence_length must be >= min_sequence_length "
                f"({self.min_sequence_length}), got {self.mean_sequence_length}; raise it or "
                f"lower min_sequence_length."
            )
        if self.max_sequence_length < self.min_sequence_length:
            raise ValueError(
                f"max_sequence_length must be >= min_sequence_length "
                f"({self.min_sequence_length}), got {self.max_sequence_length}."
            )
        return self


class DataConfig(BaseModel):
    """Which interactions to load and how to turn them into examples.

    Attributes:
        source: ``synthetic`` (see ``synthetic``), ``movielens-100k`` (``u.data``, ``u.item``,
            ``u.user`` in ``data_dir``), ``movielens-1m`` (``ratings.dat``, ``movies.dat``,
            ``users.dat`` in ``data_dir``), or ``interactions`` (the file ``path``).
        data_dir: the MovieLens folder (or a folder holding ``ml-100k/`` / ``ml-1m/`` /
            ``ml-1m-partial/``).
        path: an interactions file, ``.csv``, ``.tsv`` (optionally ``.gz``) or ``.parquet``;
            CSV/TSV files need a header row.
        user_col, item_col, time_col: column names in ``path``; ``time_col=None`` orders each
            user's interactions by file order.
        user_feature_cols: categorical user columns of ``path`` (value of the user's latest row).
        item_feature_cols: item columns of ``path`` whose values are ``|``-separated tokens
            (a bag per item, from the item's first row).
        max_history: how many recent items form an example's input history.
        holdout: what is held out of training. ``test`` (default): each user's last
            interaction is the test target and the one before it the validation target (model
            selection, quality tables); ``valid``: only the last interaction is held out, as
            validation (no test metrics); ``none``: every interaction is trained on (no
            validation, no early stopping, no test metrics; the number of epochs comes from
            ``epochs`` or ``epochs_from``).
        drop_short_users: drop users with fewer than 2 interactions instead of failing.
        synthetic: the generator settings for ``source="synthetic"``.
    """

    model_config = ConfigDict(extra="forbid")

    source: Source = "synthetic"
    data_dir: Path | None = None
    path: Path | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = "timestamp"
    user_feature_cols: list[str] = Field(default_factory=list)
    item_feature_cols: list[str] = Field(default_factory=list)
    max_history: int = Field(50, ge=1)
    holdout: Holdout = "test"
    drop_short_users: bool = False
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _check_source_fields(self) -> DataConfig:
        if self.source.startswith("movielens") and self.data_dir is None:
            files = (
                "u.data, u.item, u.user"
                if self.source == "movielens-100k"
                else ("ratings.dat, movies.dat, users.dat")
            )
            example = "ml-100k" if self.source == "movielens-100k" else "ml-1m-partial"
            raise ValueError(
                f"source={self.source!r} needs data_dir, the folder holding {files}; got none. "
                f"Set data.data_dir (e.g. ../shared/data/{example})."
            )
        if self.source == "interactions" and self.path is None:
            raise ValueError(
                "source='interactions' needs path, a .csv/.tsv/.parquet file with columns "
                f"{self.user_col!r}, {self.item_col!r}, {self.time_col!r}; got none. Set data.path."
            )
        if self.source != "interactions" and (self.user_feature_cols or self.item_feature_cols):
            raise ValueError(
                f"user_feature_cols/item_feature_cols apply to source='interactions' only, got "
                f"source={self.source!r} with user_feature_cols={self.user_feature_cols}, "
                f"item_feature_cols={self.item_feature_cols}; remove them (MovieLens and "
                f"synthetic data come with their own features)."
            )
        return self

    @model_validator(mode="after")
    def _check_distinct_columns(self) -> DataConfig:
        cols = [self.user_col, self.item_col, self.time_col]
        cols = [c for c in cols if c is not None]
        clash = set(cols) & (set(self.user_feature_cols) | set(self.item_feature_cols))
        if len(set(cols)) != len(cols) or clash:
            raise ValueError(
                f"user_col, item_col, time_col and feature columns must be distinct, got "
                f"user_col={self.user_col!r}, item_col={self.item_col!r}, "
                f"time_col={self.time_col!r}, user_feature_cols={self.user_feature_cols}, "
                f"item_feature_cols={self.item_feature_cols}."
            )
        return self
