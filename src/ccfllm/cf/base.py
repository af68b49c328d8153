"""The contract every CF backbone keeps, and the biases they all share.

Each backbone encodes users and items into l-dimensional vectors (Eq. 1 of the paper, ENC) and
scores a row with the dot product plus global, user and item biases (INT). On this CTR data the
biases carry most of the signal (how generous a user is, how liked an item is), so every backbone
has them; the embeddings add the collaborative part.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CFConfig
from ..data.dataset import CTRDataset


class CFModel(nn.Module):
    """Base class: subclasses implement `encode_users` and `encode_items`."""

    name: str = ""

    def __init__(self, config: CFConfig, n_users: int, n_items: int) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    @classmethod
    def build(cls, config: CFConfig, dataset: CTRDataset) -> CFModel:
        """A fresh model for a dataset (LightGCN also takes its graph from the train split)."""
        return cls(config, dataset.n_users, dataset.n_items)

    def adopt_shapes(self, state: dict[str, torch.Tensor]) -> None:
        """Resize data-dependent buffers to a checkpoint's before loading it (LightGCN's graph)."""

    def user_embedding(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """x_u^CF for a batch: (B,) ids and (B, H) liked histories -> (B, l)."""
        raise NotImplementedError

    def item_embedding(self, iid: torch.Tensor) -> torch.Tensor:
        """x_i^CF for a batch: (B,) or (B, H) ids -> (..., l)."""
        raise NotImplementedError

    def encode(
        self, uid: torch.Tensor, iid: torch.Tensor, history: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1: (x_u^CF, x_i^CF) for a batch of rows. -> (B, l), (B, l)"""
        return self.user_embedding(uid, history), self.item_embedding(iid)

    def score(
        self, users: torch.Tensor, items: torch.Tensor, uid: torch.Tensor, iid: torch.Tensor
    ) -> torch.Tensor:
        """INT: dot product plus biases. -> (B,) logits"""
        biases = self.global_bias + self.user_bias(uid).squeeze(-1) + self.item_bias(iid).squeeze(-1)
        return (users * items).sum(-1) + biases

    def forward(self, uid: torch.Tensor, iid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """CTR logit for each row. -> (B,)"""
        return self.score(*self.encode(uid, iid, history), uid, iid)

    def l2(
        self, users: torch.Tensor, items: torch.Tensor, uid: torch.Tensor, iid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared norms of the batch's own embeddings and of its biases, kept apart because they
        want different strengths; only the batch's rows are shrunk, so ids unseen in training stay at 0."""
        embeddings = ((users**2).sum(-1) + (items**2).sum(-1)).mean()
        biases = (self.user_bias(uid).squeeze(-1) ** 2 + self.item_bias(iid).squeeze(-1) ** 2).mean()
        return embeddings, biases
