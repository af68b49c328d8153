"""Typed configs with presets as data; an unknown or mistyped override key is an error, never ignored."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import CCFLLMError

ConfigT = TypeVar("ConfigT")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class CFConfig:
    """How a collaborative-filtering backbone is built and trained as a CTR model."""

    model: str = _help("backbone: mf, lightgcn or sasrec", "mf")
    dim: int = _help("embedding dimension l of the user/item tables (paper: 128)", 128)
    lr: float = _help("Adam learning rate (paper: 1e-3 or 1e-2)", 1e-3)
    weight_decay: float = _help("L2 penalty on the embeddings of each batch's users and items", 1e-4)
    bias_decay: float = _help("L2 penalty on the user and item biases of each batch", 1e-4)
    batch_size: int = _help("rows per step (paper: 1024)", 1024)
    max_epochs: int = _help("upper bound on epochs; early stopping usually ends sooner", 200)
    patience: int = _help("epochs without a better valid AUC before stopping", 5)
    n_layers: int = _help("LightGCN: graph propagation layers", 2)
    n_blocks: int = _help("SASRec: self-attention blocks", 2)
    n_heads: int = _help("SASRec: attention heads per block", 2)
    dropout: float = _help("SASRec: dropout on embeddings and attention", 0.2)
    max_history: int = _help("most recent liked items kept per row (CoLLM: 10)", 10)
    seed: int = _help("seed for initialisation and data order", 0)
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'", "auto")

    def __post_init__(self) -> None:
        positive = {"dim": self.dim, "batch_size": self.batch_size, "max_epochs": self.max_epochs}
        for name, value in positive.items():
            if value <= 0:
                raise CCFLLMError(f"CFConfig.{name} must be positive, got {value}.")
        if self.patience < 1:
            raise CCFLLMError(f"CFConfig.patience must be at least 1, got {self.patience}.")
        if self.lr <= 0 or self.weight_decay < 0 or self.bias_decay < 0:
            raise CCFLLMError("CFConfig.lr must be positive and weight_decay, bias_decay non-negative.")
        if not 0.0 <= self.dropout < 1.0:
            raise CCFLLMError(f"CFConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.model == "sasrec" and self.dim % self.n_heads:
            raise CCFLLMError(f"SASRec needs dim ({self.dim}) divisible by n_heads ({self.n_heads}).")


# Per-backbone settings, chosen by valid AUC on the ML-1M split (benchmarks/cf_backbones.py measures
# them). Strong L2 on the embeddings, light L2 on the biases: on this temporal split the biases carry
# most of what can be learnt, and loosely held embeddings overfit the training months.
CF_PRESETS: dict[str, dict[str, Any]] = {
    "mf": {"model": "mf", "lr": 3e-3, "weight_decay": 0.3, "bias_decay": 0.03, "batch_size": 256},
    "lightgcn": {"model": "lightgcn", "lr": 3e-3, "weight_decay": 0.3, "bias_decay": 0.03, "batch_size": 256},
    "sasrec": {"model": "sasrec", "lr": 3e-3, "weight_decay": 0.1, "bias_decay": 0.03},
}


def cf_config(model: str, **overrides: Any) -> CFConfig:
    """The preset of a backbone with overrides applied (unknown keys refused)."""
    if model not in CF_PRESETS:
        raise CCFLLMError(f"Unknown CF backbone {model!r}; choose one of {sorted(CF_PRESETS)}.")
    return replace_checked(CFConfig(), {**CF_PRESETS[model], **overrides})


def replace_checked(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """dataclasses.replace that refuses unknown keys (suggesting the closest) and coerces strings to type."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    clean = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CCFLLMError(
                f"Unknown setting '{key}' for {type(config).__name__}.{hint} Known: {sorted(fields)}."
            )
        clean[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(config, **clean)


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """'key=value' strings from the command line into a dict (values coerced later, per field)."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CCFLLMError(f"Setting {pair!r} is not of the form key=value.")
        result[key.strip().replace("-", "_")] = value.strip()
    return result


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        return kind(value)
    except ValueError as exc:
        raise CCFLLMError(f"Setting '{key}' needs a {kind.__name__}, got {value!r}.") from exc


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
