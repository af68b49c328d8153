"""What an LLM recommender is, as one frozen record: the prompt it reads, where its CF signal comes
from, how it trains and scores, the strategies it can run and the settings it changes. Each method's
module defines its record; methods/__init__.py registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import STRATEGIES, CCFConfig
from ..prompt import LAYOUTS

if TYPE_CHECKING:
    from ..cf.base import CFModel
    from ..data.dataset import CTRDataset
    from .ccf_llm import Answer


@dataclass(frozen=True)
class Loss:
    """A training loss and the click score that goes with it, under the name `CCFConfig.loss` gives it."""

    name: str
    train: Callable[[Answer, torch.Tensor, float], torch.Tensor]  # (answer, label, k) -> scalar
    score: Callable[[Answer], torch.Tensor]  # answer -> click score in [0, 1], (B,)


def _nothing_trained(config: CCFConfig) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class CFSource:
    """Where a method's x^CF comes from, and what of it a run trains and saves."""

    name: str
    reads_backbone: bool  # the run trains (or loads) a CF backbone for it
    # (config, backbone, known_users, known_items) -> the module giving x^CF (CFFeatures' interface);
    # None: the prompt has no CF position
    features: Callable[[CCFConfig, CFModel | None, torch.Tensor, torch.Tensor], nn.Module] | None = None
    # config -> the state-dict prefixes of x^CF's own trained weights, saved beside ALG and GATE
    trained: Callable[[CCFConfig], tuple[str, ...]] = _nothing_trained
    tunable: bool = False  # `tune_cf` can train it with the fusion stage
    # (backbone, dataset) -> uid -> item ids the prompt lists (the 'cf-text' layout); None: no such list
    ranking: Callable[[CFModel, CTRDataset], dict[int, list[int]]] | None = None


NO_CF = CFSource("none", reads_backbone=False)


@dataclass(frozen=True)
class Method:
    """One LLM recommender. Its settings are what it changes from CCFConfig's defaults besides its loss
    (which it always sets); `strategies` are those it can run, and `strategy_note` says why, for the
    message that refuses another."""

    name: str
    title: str  # how tables name it
    prompt: str  # the layout its CF-carrying stages read (stage 1 may read text: CCFConfig.stage1_prompt)
    cf_source: CFSource
    loss: Loss
    strategies: tuple[str, ...] = STRATEGIES
    strategy_note: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    two_backbones: bool = False  # Eq. 7: it can fuse a second backbone (cf_model2)

    def __post_init__(self) -> None:
        known = {f.name for f in fields(CCFConfig)} - {"method", "loss"}
        if self.prompt not in LAYOUTS:
            raise ValueError(f"Method {self.name!r}: prompt {self.prompt!r} is not one of {list(LAYOUTS)}.")
        if not self.strategies or not set(self.strategies) <= set(STRATEGIES):
            raise ValueError(f"Method {self.name!r}: strategies must be among {list(STRATEGIES)}.")
        if not set(self.settings) <= known:
            raise ValueError(f"Method {self.name!r}: unknown settings {sorted(set(self.settings) - known)}.")
        if self.settings.get("strategy", CCFConfig.strategy) not in self.strategies:
            raise ValueError(f"Method {self.name!r}: its default strategy is not among its strategies.")
        if (self.prompt == "cf-text") != (self.cf_source.ranking is not None):
            raise ValueError(f"Method {self.name!r}: the 'cf-text' prompt, and only it, lists a CF ranking.")
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def defaults(self) -> dict[str, Any]:
        """The settings `ccf_config` applies for this method, under the preset's overrides."""
        return {"loss": self.loss.name, **self.settings}

    @property
    def uses_backbone(self) -> bool:
        """Whether the method needs a trained CF backbone (as embeddings, or for its ranking as text)."""
        return self.cf_source.reads_backbone
