"""LightGCN (He et al., 2020) on the user-item graph of the training positives.

E^(k+1) = D^-1/2 A D^-1/2 E^(k); the final embedding is the mean of E^(0..K). The graph is a buffer
of the module, so a saved checkpoint carries the exact graph it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import CFConfig
from ..data.dataset import CTRDataset
from .base import CFModel


class LightGCN(CFModel):
    name = "lightgcn"

    def __init__(
        self, config: CFConfig, n_users: int, n_items: int, edges: torch.Tensor | None = None
    ) -> None:
        super().__init__(config, n_users, n_items)
        self.user_table = nn.Embedding(n_users, config.dim)
        self.item_table = nn.Embedding(n_items, config.dim)
        nn.init.normal_(self.user_table.weight, std=0.01)
        nn.init.normal_(self.item_table.weight, std=0.01)
        # (2, E) user ids and item ids of the training positives
        self.register_buffer("edges", edges if edges is not None else torch.zeros(2, 0, dtype=torch.long))
        self._propagated: tuple[torch.Tensor, torch.Tensor] | None = None
        self._adjacency: tuple[tuple, torch.Tensor] | None = None  # (which edges it was built from, matrix)

    @classmethod
    def build(cls, config: CFConfig, dataset: CTRDataset) -> LightGCN:
        train = dataset.train
        liked = train.label == 1
        edges = torch.from_numpy(np.unique(np.stack([train.uid[liked], train.iid[liked]]), axis=1))
        return cls(config, dataset.n_users, dataset.n_items, edges=edges)

    def adopt_shapes(self, state: dict[str, torch.Tensor]) -> None:
        if "edges" in state:
            self.edges = torch.zeros_like(state["edges"], device=self.edges.device)

    def normalised_adjacency(self) -> torch.Tensor:
        """Symmetric-normalised (U+I, U+I) sparse adjacency of the bipartite graph, built once per graph."""
        key = (self.edges.data_ptr(), self.edges.device, self.edges.shape)
        if self._adjacency is None or self._adjacency[0] != key:
            self._adjacency = (key, self._build_adjacency())
        return self._adjacency[1]

    def _build_adjacency(self) -> torch.Tensor:
        users, items = self.edges[0], self.edges[1] + self.n_users
        rows = torch.cat([users, items])
        cols = torch.cat([items, users])
        n_nodes = self.n_users + self.n_items
        degree = torch.zeros(n_nodes, device=rows.device).index_add_(
            0, rows, torch.ones_like(rows, dtype=torch.float)
        )
        inv_sqrt = degree.clamp(min=1).rsqrt()
        values = inv_sqrt[rows] * inv_sqrt[cols]
        adjacency = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, (n_nodes, n_nodes), check_invariants=False
        )
        return adjacency.coalesce()

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All users' and items' final embeddings; cached in eval mode, recomputed per step in training."""
        if not self.training and self._propagated is not None:
            return self._propagated
        adjacency = self.normalised_adjacency()
        layer = torch.cat([self.user_table.weight, self.item_table.weight])  # (U+I, l)
        layers = [layer]
        for _ in range(self.config.n_layers):
            layer = torch.sparse.mm(adjacency, layer)
            layers.append(layer)
        final = torch.stack(layers).mean(0)
        users, items = final[: self.n_users], final[self.n_users :]
        self._propagated = None if self.training else (users, items)
        return users, items

    def train(self, mode: bool = True) -> LightGCN:
        self._propagated = None
        return super().train(mode)

    def encode(
        self, uid: torch.Tensor, iid: torch.Tensor, history: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.propagate()  # once per batch, not once per side
        return users[uid], items[iid]

    def user_embedding(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.propagate()[0][uid]

    def item_embedding(self, iid: torch.Tensor) -> torch.Tensor:
        return self.propagate()[1][iid]
