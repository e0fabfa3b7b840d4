"""The sequence tower: causal self-attention over the history (SASRec-style), and the tower
factory both the trainer and the artifact reader use.

The input at history position ``t`` is the item's input embedding (times ``sqrt(Dh)``), plus a
learned position embedding, plus (optionally) the mean of the item's side-feature embeddings;
``blocks`` causal self-attention blocks follow (each position attends to itself and to the
non-padded positions before it), with dropout and pre- or post-layer norm. The output at
position ``t`` is the user vector after items ``0..t``: in training every position is a
target (:func:`trainer.step.train_step`), at inference the last non-padded position is the user
vector. Positions are counted from the first non-padded item, so left and right padding, and
any padded batch width, give the same vectors.

Shapes: ``B`` batch, ``L`` history length, ``Dh`` history dim, ``D`` output dim, ``K``
side-feature tokens per item.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model import ModelConfig, UserTower, add_feature_embeddings, user_feature_vectors


def _at(t: torch.Tensor, query: torch.Tensor | int, dim: int = 1) -> torch.Tensor:
    """``t``'s entries at position ``query`` along ``dim`` (one per row: int64 ``[B]``, or the
    same for every row: an int, a cheap slice), the dimension kept with size 1."""
    if isinstance(query, int):
        return t.narrow(dim, query, 1)
    rows = torch.arange(t.shape[0], device=t.device)
    return (t[rows, query] if dim == 1 else t[rows, :, query]).unsqueeze(dim)


class _Block(nn.Module):
    """Multi-head causal self-attention and a point-wise feed-forward net, with residuals."""

    def __init__(self, dim: int, heads: int, dropout: float, pre_norm: bool, ffn: int) -> None:
        super().__init__()
        self.heads, self.dropout, self.pre_norm = heads, dropout, pre_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim)
        )
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _attend(
        self, x: torch.Tensor, allowed: torch.Tensor, query: torch.Tensor | int | None
    ) -> torch.Tensor:
        """Attention output ``[B, Lq, Dh]``: for every position (``query`` None, ``Lq = L``)
        or for one position per row (``query``, see `_at`; ``Lq = 1``; keys and values still
        from every position)."""
        b, dim = x.shape[0], x.shape[2]
        if query is None:
            q, k, v = self.qkv(x).chunk(3, dim=2)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(_at(x, query), weight[:dim], bias[:dim])  # [B, 1, Dh]
            k, v = F.linear(x, weight[dim:], bias[dim:]).chunk(2, dim=2)
            allowed = _at(allowed, query, dim=2)  # [B, 1, 1, L]
        q, k, v = (
            t.reshape(b, -1, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, -1, dim))

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, query: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``x`` float ``[B, L, Dh]``; ``allowed`` bool ``[B, 1, L, L]`` (query, key).

        Returns ``[B, L, Dh]``, or with ``query`` (see `_at`) the output at that one position
        of each row, ``[B, 1, Dh]`` (the same values, at a fraction of the work: the tower's
        last block at inference).
        """
        here = x if query is None else _at(x, query)
        if self.pre_norm:
            x = here + self.drop(self._attend(self.norm1(x), allowed, query))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(here + self.drop(self._attend(x, allowed, query)))
        return self.norm2(x + self.drop(self.ffn(x)))


class SequenceTower(nn.Module):
    """Causal self-attention over the history -> user vector(s) (see the module docstring).

    Args: as :class:`trainer.model.UserTower` (user features are embedded and joined to the
    output through a linear layer; the example age is not used).
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
        self.cfg, self.max_history = cfg, max_history
        s, dim = cfg.sequence, cfg.history_dim
        self.positions = nn.Embedding(max_history, dim)
        nn.init.normal_(self.positions.weight, std=cfg.init_std)
        self.input_drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(
            [
                _Block(dim, s.heads, s.dropout, s.norm == "pre", s.ffn_factor * dim)
                for _ in range(s.blocks)
            ]
        )
        self.final_norm = nn.LayerNorm(dim) if s.norm == "pre" else nn.Identity()
        add_feature_embeddings(
            self, cfg, user_feature_sizes, item_features, num_item_feature_tokens
        )
        if self.use_item_features:
            self.item_feature_proj = nn.Linear(cfg.feature_dim, dim)
        head_in = dim + cfg.feature_dim * len(self.user_feature_names)
        self.head = (
            nn.Linear(head_in, cfg.embedding_dim)
            if head_in != cfg.embedding_dim or self.user_feature_names
            else nn.Identity()
        )

    def forward(
        self,
        history_rows: torch.Tensor,
        history_ids: torch.Tensor,
        user_features: dict[str, torch.Tensor] | None = None,
        example_age_days: torch.Tensor | None = None,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """User vectors.

        Args:
            history_rows: float ``[B, L, Dh]`` input embeddings of the history items (any value
                where padded).
            history_ids: int64 ``[B, L]`` item ids, -1 where padded (left, right, or both).
            user_features: name -> int64 ``[B]`` codes (0 = unknown).
            example_age_days: ignored (the mean tower's feature).
            all_positions: return the output of every position, not only the last one.

        Returns:
            float ``[B, D]`` (the last non-padded position of each row; position 0 for a row
            with no item), or ``[B, L, D]`` with ``all_positions``.
        """
        valid = history_ids >= 0  # [B, L]
        batch, length = history_ids.shape
        order = (valid.cumsum(1) - 1).clamp(0, self.max_history - 1)  # from the first item
        x = history_rows * math.sqrt(history_rows.shape[2]) + self.positions(order)
        if self.use_item_features:
            tokens = self.item_features[history_ids.clamp(min=0)]  # [B, L, K]
            tok_valid = ((tokens >= 0) & valid.unsqueeze(2)).to(x.dtype).unsqueeze(3)
            emb = self.item_feature_embedding(tokens.clamp(min=0)) * tok_valid  # [B, L, K, F]
            bag = emb.sum(2) / tok_valid.sum(2).clamp(min=1.0)
            x = x + self.item_feature_proj(bag)
        x = self.input_drop(x) * valid.unsqueeze(2).to(x.dtype)
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
        allowed = (causal & valid.unsqueeze(1)) | eye  # [B, L(query), L(key)]
        allowed = allowed.unsqueeze(1)
        if all_positions:
            for block in self.blocks:
                x = block(x, allowed)
        else:  # only the last position's output is needed: the last block computes just it
            last = (valid.long() * torch.arange(length, device=x.device)).amax(1)  # [B]
            for block in self.blocks[:-1]:
                x = block(x, allowed)
            # left-padded rows (the encoder's) all end at the last column: a slice, no gather
            query = length - 1 if bool((last == length - 1).all()) else last
            x = self.blocks[-1](x, allowed, query=query).squeeze(1)  # [B, Dh]
        x = self.final_norm(x)
        if self.user_feature_names:
            parts = user_feature_vectors(self, user_features, batch, x.device)
            feats = torch.cat(parts, 1).to(x.dtype)  # [B, F * n]
            if all_positions:
                feats = feats.unsqueeze(1).expand(batch, length, feats.shape[1])
            x = torch.cat([x, feats], -1)
        return self.head(x)


def build_user_tower(
    cfg: ModelConfig,
    user_feature_sizes: dict[str, int] | None = None,
    item_features: torch.Tensor | None = None,
    num_item_feature_tokens: int = 0,
    max_history: int = 50,
) -> UserTower | SequenceTower:
    """The tower ``cfg.tower`` names (``mean``: :class:`UserTower`, ``sequence``:
    :class:`SequenceTower`), freshly initialised."""
    cls = SequenceTower if cfg.tower == "sequence" else UserTower
    return cls(cfg, user_feature_sizes, item_features, num_item_feature_tokens, max_history)
