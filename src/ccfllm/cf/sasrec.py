"""SASRec (Kang & McAuley, 2018): causal self-attention over the user's liked history.

The user's vector is the encoder's output at the most recent history position; items share one
table between history and target, as in the original. Cold users are no problem: the vector comes
from the history, not from a per-user table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import CFConfig
from ..data.dataset import PAD
from .base import CFModel


class SASRec(CFModel):
    name = "sasrec"

    def __init__(self, config: CFConfig, n_users: int, n_items: int) -> None:
        super().__init__(config, n_users, n_items)
        self.item_table = nn.Embedding(n_items, config.dim, padding_idx=PAD)
        self.positions = nn.Embedding(config.max_history, config.dim)
        nn.init.normal_(self.item_table.weight, std=0.01)
        nn.init.normal_(self.positions.weight, std=0.01)
        with torch.no_grad():
            self.item_table.weight[PAD].zero_()
        block = nn.TransformerEncoderLayer(
            config.dim,
            config.n_heads,
            dim_feedforward=config.dim,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, config.n_blocks, enable_nested_tensor=False)
        self.input_dropout = nn.Dropout(config.dropout)
        self.final_norm = nn.LayerNorm(config.dim)
        causal = torch.triu(torch.ones(config.max_history, config.max_history, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def user_embedding(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        width = history.shape[1]
        if width > self.config.max_history:
            raise ValueError(
                f"history has {width} positions; this SASRec was built for {self.config.max_history}"
            )
        positions = self.positions.weight[-width:]  # histories are left-padded: align on the most recent
        hidden = self.item_table(history) * math.sqrt(self.config.dim) + positions  # (B, H, l)
        # Block future positions and padding keys, but let every position see itself, so that no
        # attention row is fully masked (that gives NaNs, which then leak through masked keys).
        blocked = self.causal_mask[:width, :width] | (history == PAD)[:, None, :]  # (B, H, H)
        blocked = blocked & ~torch.eye(width, dtype=torch.bool, device=history.device)
        hidden = self.encoder(
            self.input_dropout(hidden), mask=blocked.repeat_interleave(self.config.n_heads, dim=0)
        )
        return self.final_norm(hidden[:, -1])  # (B, l)

    def item_embedding(self, iid: torch.Tensor) -> torch.Tensor:
        return self.item_table(iid)
