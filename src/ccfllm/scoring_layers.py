"""Llama-style decoder layers with their element-wise work compiled, for scoring.

Scoring runs without gradients and with a key/value cache, which whole compiled layers do not take
well (dynamo hit its recompile limit). Here only the parts around attention are compiled: the input
RMSNorm, and the residual add + RMSNorm + SwiGLU MLP + residual add after it. They are pure functions
of the activations and the weights, so every layer runs the same compiled graph, for any length.
Measured on 1,024 test rows of the default LLM (bf16, this 2-core CPU): about 10% faster than eager,
and closer to float32 (inductor keeps the element-wise chain in float32 where eager rounds each step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .llm import compile_errors, warn_uncompiled


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, scaled by `weight` in the input's dtype."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def feed_forward_block(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """hidden + MLP(RMSNorm(hidden)), the SwiGLU MLP: down(silu(gate x) * up x)."""
    x = rms_norm(hidden, norm_weight, eps)
    return hidden + F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


_compiled: dict[str, object] = {}


def _compiled_parts():
    if not _compiled:
        _compiled["norm"] = torch.compile(rms_norm, dynamic=True)
        _compiled["block"] = torch.compile(feed_forward_block, dynamic=True)
    return _compiled["norm"], _compiled["block"]


def fits(layer: torch.nn.Module) -> bool:
    """A Llama-style layer: RMSNorms with `variance_epsilon`, a SwiGLU MLP of plain bias-free linears."""
    mlp = getattr(layer, "mlp", None)
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    if (
        mlp is None
        or not hasattr(layer, "self_attn")
        or not all(hasattr(n, "variance_epsilon") for n in norms)
    ):
        return False
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    plain = all(type(linear) is torch.nn.Linear and linear.bias is None for linear in linears)
    return plain and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def _forward(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The layer's forward with the compiled parts; where compiling fails (no C++ compiler, say), the
    layer's own forward, with one warning, from then on."""
    if not _compiled.get("failed"):
        try:
            return _compiled_forward(layer, hidden_states, **kwargs)
        except compile_errors() as error:
            _compiled["failed"] = True
            warn_uncompiled(error, "scoring", "compile_scoring")
    return type(layer).forward(layer, hidden_states, **kwargs)


def _compiled_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    norm, block = _compiled_parts()
    before, after, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
    attended, _ = layer.self_attn(
        hidden_states=norm(hidden_states, before.weight, before.variance_epsilon), **kwargs
    )
    return block(
        hidden_states + attended,
        after.weight,
        after.variance_epsilon,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
    )


@contextmanager
def compiled_scoring(decoder: torch.nn.Module) -> Iterator[None]:
    """Within this block the decoder's Llama-style layers run `_forward`; other layers as they are."""
    layers = [layer for layer in getattr(decoder, "layers", []) if fits(layer)]
    try:
        for layer in layers:
            layer.forward = _forward.__get__(layer)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
