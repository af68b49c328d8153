"""Collaborative-filtering backbones behind one interface, in a registry filled here explicitly."""

from __future__ import annotations

from ..errors import CCFLLMError
from .base import CFModel
from .lightgcn import LightGCN
from .mf import MF
from .sasrec import SASRec

CF_MODELS: dict[str, type[CFModel]] = {}


def register_cf_model(model_class: type[CFModel]) -> type[CFModel]:
    """Add a backbone under its `name`; a second registration of a name is a bug and raises."""
    name = model_class.name
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"A CF backbone needs a lower-case identifier as its name, got {name!r}.")
    if name in CF_MODELS:
        raise ValueError(f"CF backbone {name!r} is already registered ({CF_MODELS[name].__qualname__}).")
    CF_MODELS[name] = model_class
    return model_class


def cf_model_class(name: str) -> type[CFModel]:
    if name not in CF_MODELS:
        raise CCFLLMError(f"Unknown CF backbone {name!r}; choose one of {sorted(CF_MODELS)}.")
    return CF_MODELS[name]


for _model_class in (MF, LightGCN, SASRec):
    register_cf_model(_model_class)

__all__ = ["CF_MODELS", "CFModel", "LightGCN", "MF", "SASRec", "cf_model_class", "register_cf_model"]
