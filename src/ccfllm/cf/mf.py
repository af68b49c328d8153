"""MF: matrix factorisation with biases (Koren et al.), trained as a CTR model."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CFConfig
from .base import CFModel


class MF(CFModel):
    name = "mf"

    def __init__(self, config: CFConfig, n_users: int, n_items: int) -> None:
        super().__init__(config, n_users, n_items)
        self.user_table = nn.Embedding(n_users, config.dim)
        self.item_table = nn.Embedding(n_items, config.dim)
        nn.init.normal_(self.user_table.weight, std=0.01)
        nn.init.normal_(self.item_table.weight, std=0.01)

    def user_embedding(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.user_table(uid)

    def item_embedding(self, iid: torch.Tensor) -> torch.Tensor:
        return self.item_table(iid)
