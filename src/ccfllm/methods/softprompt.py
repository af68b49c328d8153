"""Softprompt: CoLLM's prompt with free, trainable user and item embeddings in place of a CF model's.

The [User] position and each item's extra slot read rows of tables that start random and are trained,
through the same mapping MLP, in the second stage (after text-only LoRA, as CoLLM runs it). Nothing
ties them to collaborative filtering: the paper's Table 3 baseline for "tuning the embeddings of
special tokens without a CF model" (section 4.3, observation 5). Users and items absent from the
training rows read zero vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CCFConfig, cf_config
from .ccf_llm import CFFeatures
from .collm import YES_LOGIT
from .method import CFSource, Method


class FreeFeatures(nn.Module):
    """Trainable user and item tables with CFFeatures' interface. (B,) ids -> (B, dim)

    Users and items absent from the training rows read zero vectors, as in CFFeatures: their rows
    would never have been trained.
    """

    trainable = True

    def __init__(self, known_users: torch.Tensor, known_items: torch.Tensor, dim: int):
        super().__init__()
        self.user_table = nn.Embedding(len(known_users), dim)
        self.item_table = nn.Embedding(len(known_items), dim)
        for table in (self.user_table, self.item_table):
            nn.init.normal_(table.weight, std=0.1)
        self.register_buffer("known_users", known_users.bool(), persistent=False)
        self.register_buffer("known_items", known_items.bool(), persistent=False)
        self.dim = dim

    def users(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return _rows(self.user_table, self.known_users, uid)

    def items(self, iid: torch.Tensor) -> torch.Tensor:
        return _rows(self.item_table, self.known_items, iid)


def _rows(table: nn.Embedding, known: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    is_known = CFFeatures._known(known, ids)
    return table(torch.where(is_known, ids, torch.zeros_like(ids))) * is_known[:, None]


def free_features(
    config: CCFConfig, backbone: None, known_users: torch.Tensor, known_items: torch.Tensor
) -> FreeFeatures:
    """Fresh tables as wide as the backbone `cf_model` would be, so that ALG has the same shape."""
    return FreeFeatures(known_users, known_items, cf_config(config.cf_model).dim)


def _tables(config: CCFConfig) -> tuple[str, ...]:
    return ("cf.user_table.", "cf.item_table.")


FREE_TABLES = CFSource("free", reads_backbone=False, features=free_features, trained=_tables)
SOFTPROMPT = Method("softprompt", "Softprompt", prompt="slots", cf_source=FREE_TABLES, loss=YES_LOGIT)
