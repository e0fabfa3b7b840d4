"""The YouTube-DNN candidate generator (Covington et al., 2016): the user tower and its config.

The item tables (input embeddings, output embeddings and biases) are NOT parameters of the
tower: they live in an embedding store (in process, or sharded over Ray actors) and only the
rows a step needs are pulled. The tower turns pulled history rows and user features into the
user vector ``u``; the score of item ``i`` is ``u . w_i + b_i``.

Shapes: ``B`` batch, ``L`` history length, ``Dh`` input item dim, ``D`` output dim,
``K`` side-feature tokens per item.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

SECONDS_PER_DAY = 86_400.0


class SequenceConfig(BaseModel):
    """The causal self-attention tower (``model.sequence``, used when ``model.tower=sequence``;
    SASRec-style, see ``trainer.sequence``)."""

    model_config = ConfigDict(extra="forbid")

    blocks: int = Field(2, ge=1, description="self-attention blocks")
    heads: int = Field(1, ge=1, description="attention heads (must divide the history dim)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="embedding, attention, FFN dropout")
    norm: Literal["pre", "post"] = Field("pre", description="layer norm before or after blocks")
    ffn_factor: int = Field(1, ge=1, description="feed-forward width = ffn_factor * dim")
    window_targets: int | None = Field(
        10,
        ge=1,
        description="training targets per window of max_history items (None: max_history, "
        "no overlap); fewer gives every target at least max_history - window_targets items of "
        "context, at more compute per target",
    )


class ModelConfig(BaseModel):
    """The user tower and the item tables (``TrainConfig.model``; saved with every export, so
    the service rebuilds the same tower from it).

    ``tower``: ``mean`` (default) is the YouTube-DNN tower below (mean-pooled history + features
    -> ReLU MLP); ``sequence`` is the causal self-attention tower of ``trainer.sequence``
    (settings in ``sequence``; ``hidden``, ``recent_items``, ``position_weights`` and
    ``use_example_age`` are the mean tower's and do not apply to it).
    """

    model_config = ConfigDict(extra="forbid")

    tower: Literal["mean", "sequence"] = Field("mean", description="mean pooling or attention")
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)

    embedding_dim: int = Field(64, ge=1, description="user vector = item output embedding size")
    input_dim: int | None = Field(
        None, ge=1, description="input (watch history) item embedding size; default embedding_dim"
    )
    hidden: list[int] = Field(default_factory=lambda: [256], description="ReLU tower widths")
    feature_dim: int = Field(16, ge=1, description="size of each categorical feature embedding")
    use_user_features: bool = True
    use_item_features: bool = Field(True, description="bag of the history items' side features")
    use_example_age: bool = Field(True, description="the paper's 'example age' feature")
    recent_items: int = Field(
        0, ge=0, description="also mean-pool the most recent N history items (0: off)"
    )
    position_weights: bool = Field(
        False, description="learn a pooling weight per history position (recency decay)"
    )
    tie_weights: bool = Field(False, description="input item embeddings = output embeddings")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.05, gt=0.0, description="std of the item embedding init")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"model.hidden widths must be >= 1, got {self.hidden}.")
        if self.tie_weights and self.input_dim not in (None, self.embedding_dim):
            raise ValueError(
                f"model.tie_weights needs input_dim == embedding_dim, got input_dim="
                f"{self.input_dim} and embedding_dim={self.embedding_dim}; drop input_dim."
            )
        if self.tower == "sequence" and self.history_dim % self.sequence.heads:
            raise ValueError(
                f"model.sequence.heads ({self.sequence.heads}) must divide the history dim "
                f"({self.history_dim} = input_dim or embedding_dim); pick heads 1 or a divisor."
            )
        return self

    @property
    def history_dim(self) -> int:
        return self.input_dim or self.embedding_dim


def add_feature_embeddings(
    tower: nn.Module,
    cfg: ModelConfig,
    user_feature_sizes: dict[str, int] | None,
    item_features: torch.Tensor | None,
    num_item_feature_tokens: int,
) -> None:
    """Give ``tower`` (either tower) its feature tables: ``user_feature_names``,
    ``user_embeddings`` (name -> ``[size, F]``), ``use_item_features`` and, when used, the
    ``item_features`` buffer ``[num_items, K]`` and ``item_feature_embedding`` ``[G, F]``."""
    sizes = user_feature_sizes if cfg.use_user_features else {}
    tower.user_feature_names = sorted(sizes or {})
    tower.user_embeddings = nn.ModuleDict(
        {name: nn.Embedding(sizes[name], cfg.feature_dim) for name in tower.user_feature_names}
    )
    tower.use_item_features = bool(
        cfg.use_item_features and item_features is not None and num_item_feature_tokens > 0
    )
    if tower.use_item_features:
        tower.register_buffer("item_features", item_features.long(), persistent=True)
        tower.item_feature_embedding = nn.Embedding(num_item_feature_tokens, cfg.feature_dim)


def user_feature_vectors(
    tower: nn.Module,
    user_features: dict[str, torch.Tensor] | None,
    batch: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """The embedding ``[B, F]`` of each of ``tower.user_feature_names`` (missing names: code 0,
    out-of-range codes clamped)."""
    out = []
    for name in tower.user_feature_names:
        codes = (user_features or {}).get(name)
        if codes is None:
            codes = torch.zeros(batch, dtype=torch.long, device=device)
        table = tower.user_embeddings[name]
        out.append(table(codes.clamp(0, table.num_embeddings - 1)))
    return out


def example_age_features(age_days: torch.Tensor) -> torch.Tensor:
    """The paper's example-age feature and its powers: ``[x, x^2, sqrt(x)]`` for ``x`` in days/365.

    Args:
        age_days: float ``[B]``, >= 0 (0 at serving time).

    Returns:
        float ``[B, 3]``.
    """
    x = (age_days.clamp(min=0.0) / 365.0).unsqueeze(1)
    return torch.cat([x, x * x, torch.sqrt(x)], 1)


class UserTower(nn.Module):
    """Mean-pooled history + categorical user features + bag of history side features +
    example age -> ReLU MLP -> user vector ``[B, D]``.

    Args:
        cfg: the model section of the config.
        user_feature_sizes: vocabulary size (index 0 = unknown) of each categorical user feature.
        item_features: int64 ``[num_items, K]`` side-feature tokens of each item (-1 padded), or
            None; kept as a buffer (not trained).
        num_item_feature_tokens: size of the side-feature vocabulary.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        user_feature_sizes: dict[str, int] | None = None,
        item_features: torch.Tensor | None = None,
        num_item_feature_tokens: int = 0,
        max_history: int = 50,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        add_feature_embeddings(
            self, cfg, user_feature_sizes, item_features, num_item_feature_tokens
        )
        if cfg.position_weights:
            # Log-weights per position counted from the most recent item; 0 = a plain mean.
            self.position_logits = nn.Parameter(torch.zeros(max_history))
        in_dim = cfg.history_dim * (2 if cfg.recent_items else 1)
        in_dim += cfg.feature_dim * len(self.user_feature_names)
        in_dim += cfg.feature_dim if self.use_item_features else 0
        in_dim += 3 if cfg.use_example_age else 0
        layers: list[nn.Module] = []
        for width in cfg.hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            in_dim = width
        layers.append(nn.Linear(in_dim, cfg.embedding_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        history_rows: torch.Tensor,
        history_ids: torch.Tensor,
        user_features: dict[str, torch.Tensor] | None = None,
        example_age_days: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute user vectors.

        Args:
            history_rows: float ``[B, L, Dh]`` input embeddings of the history items (any value
                where the history is padded).
            history_ids: int64 ``[B, L]`` global item ids of the history, -1 where padded.
            user_features: name -> int64 ``[B]`` codes (0 = unknown); missing names count as 0.
            example_age_days: float ``[B]``; None means 0 (serving).

        Returns:
            float ``[B, D]``.
        """
        mask = (history_ids >= 0).to(history_rows.dtype).unsqueeze(2)  # [B, L, 1]
        if self.cfg.position_weights:
            length = history_ids.shape[1]
            w = torch.exp(self.position_logits[:length].flip(0)).to(mask.dtype)  # [L]
            weights = mask * w.view(1, length, 1)
        else:
            weights = mask
        parts = [(history_rows * weights).sum(1) / weights.sum(1).clamp(min=1e-6)]
        if self.cfg.recent_items:
            # Histories are right-aligned: the last columns are the most recent items.
            k = self.cfg.recent_items
            recent_mask = mask[:, -k:]
            recent = (history_rows[:, -k:] * recent_mask).sum(1)
            parts.append(recent / recent_mask.sum(1).clamp(min=1.0))
        batch = history_ids.shape[0]
        parts += user_feature_vectors(self, user_features, batch, history_ids.device)
        if self.use_item_features:
            # Mean of the side-feature embeddings of all history tokens, as token counts
            # [B, G] times the table [G, F]: same value as a gather of [B, L, K, F], with a
            # cheap backward pass.
            tokens = self.item_features[history_ids.clamp(min=0)].flatten(1)  # [B, L*K]
            valid = (tokens >= 0) & (history_ids >= 0).repeat_interleave(
                self.item_features.shape[1], dim=1
            )
            table = self.item_feature_embedding.weight
            counts = torch.zeros(batch, table.shape[0], device=tokens.device, dtype=table.dtype)
            counts.scatter_add_(1, tokens.clamp(min=0), valid.to(table.dtype))
            parts.append((counts @ table) / counts.sum(1, keepdim=True).clamp(min=1.0))
        if self.cfg.use_example_age:
            if example_age_days is None:
                example_age_days = torch.zeros(batch, device=history_ids.device)
            parts.append(example_age_features(example_age_days.float()))
        x = torch.cat([p.to(parts[0].dtype) for p in parts], 1)
        return self.mlp(x)


def init_rows(
    global_ids: torch.Tensor, dim: int, std: float, seed: int, table: str, chunk: int = 65_536
) -> torch.Tensor:
    """Deterministic N(0, std^2) rows for the given global ids, whatever the sharding.

    Row ``i`` depends only on ``(seed, table, i)``: rows are generated in fixed chunks of global
    ids with one generator per chunk, so a shard initialises exactly the rows the unsharded
    table has.

    Returns:
        float32 ``[len(global_ids), dim]``.
    """
    ids = global_ids.cpu().long()
    out = torch.empty(ids.numel(), dim)
    if ids.numel() == 0:
        return out
    salt = sum(ord(c) * 131**k for k, c in enumerate(table)) % 1_000_003
    chunks = ids // chunk
    for c in torch.unique(chunks).tolist():
        sel = torch.nonzero(chunks == c).squeeze(1)
        gen = torch.Generator().manual_seed(seed * 1_000_003 * 7 + salt * 65_537 + c)
        block = torch.randn(chunk, dim, generator=gen) * std
        out[sel] = block[ids[sel] - c * chunk]
    return out


class UserEncoder:
    """Inference: item histories (internal ids) + features -> user vectors, on CPU.

    Holds the tower and the input item embeddings; used by evaluation and by the service.
    """

    def __init__(self, tower: UserTower, input_embeddings: torch.Tensor, max_history: int) -> None:
        self.tower = tower.eval()
        self.input_embeddings = input_embeddings
        self.max_history = max_history

    @torch.no_grad()
    def encode(
        self,
        histories: list[list[int]] | np.ndarray | torch.Tensor,
        user_features: dict[str, torch.Tensor | np.ndarray] | None = None,
    ) -> torch.Tensor:
        """User vectors ``[B, D]`` for histories of internal item ids (most recent last).

        Args:
            histories: a list of id lists (each truncated to the most recent ``max_history``),
                or an int ``[B, L]`` array padded with -1 on the left.
            user_features: name -> codes ``[B]``.
        """
        hist = self._pad(histories)
        rows = self.input_embeddings[hist.clamp(min=0)]
        feats = {k: torch.as_tensor(v, dtype=torch.long) for k, v in (user_features or {}).items()}
        return self.tower(rows, hist, feats, None).float()

    def _pad(self, histories) -> torch.Tensor:
        if isinstance(histories, (np.ndarray, torch.Tensor)):
            return torch.as_tensor(histories, dtype=torch.long)
        length = max(1, min(self.max_history, max((len(h) for h in histories), default=1)))
        out = torch.full((len(histories), length), -1, dtype=torch.long)
        for r, h in enumerate(histories):
            h = list(h)[-length:]
            if h:
                out[r, length - len(h) :] = torch.as_tensor(h, dtype=torch.long)
        return out
