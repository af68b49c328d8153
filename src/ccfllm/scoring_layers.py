"""Llama and Qwen2 decoder layers as one compiled function each, for scoring (`compile_scoring`).

The engine (engine.py) runs each prompt's shared prefix once and its suffix on top. Through the
decoder's own forward that pays, per layer and per batch, for a key/value cache object, eager
rotary embeddings, norms and residual adds, and a copy of the whole cache for the suffixes. Here one
pure function computes a whole layer from the activations, the weights and (for the suffixes) the
prefix keys and values; torch.compile fuses its element-wise work, and every layer runs the same graph
for any batch and length. The prefixes and the suffixes go through the layers side by side, so only
one layer's prefix keys and values are copied to the suffix rows at a time.

Measured on the default LLM (bf16, this 2-core CPU, benchmarks/speed.py): see the README's Speed.
Llama layers (Llama, Vicuna, SmolLM2, TinyLlama) and Qwen2 layers (Qwen2, Qwen2.5: the same block with
biases on q, k and v, several query heads per key/value head, an untied output layer and its own rope
base, which the decoder's `rotary_emb` carries) take this path, with plain or merged-LoRA linears;
a Qwen2 decoder with sliding-window layers, and any other decoder, are scored through their own
forward. Where compiling fails (no C++ compiler, say) the same function runs uncompiled, with one
warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .llm_speed import compile_errors, warn_uncompiled
from .methods.ccf_llm import positions_from_mask


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, scaled by `weight` in the input's dtype."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, heads, T, head_dim) with Llama's (B, T, head_dim) cos and sin."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


def decoder_layer(
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    past_keys: torch.Tensor | None,
    past_values: torch.Tensor | None,
    weights: tuple[torch.Tensor, ...],
    eps: float,
    scale: float,
    last_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Llama or Qwen2 layer. hidden (B, T, d); `bias` (B, 1, T, past + T) is 0 where a position
    sees a key and -inf where not; past keys/values (B, kv_heads, past, head_dim) or None. -> hidden,
    and the keys and values of the past and this pass. With `last_only` (the decoder's last layer,
    where only the answer position is read) the returned hidden is the last position's alone,
    (B, 1, d): every position's keys and values, but the query, attention output and MLP of one."""
    norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down = weights  # linears: (weight, bias)
    head_dim = cos.shape[-1]

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)

    x = rms_norm(hidden, norm1, eps)
    keys = rotate(heads(linear(x, k_proj)), cos, sin)
    values = heads(linear(x, v_proj))
    if last_only:
        hidden, x, cos, sin, bias = hidden[:, -1:], x[:, -1:], cos[:, -1:], sin[:, -1:], bias[:, :, -1:]
    queries = rotate(heads(linear(x, q_proj)), cos, sin)
    if past_keys is not None:
        keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
    attended = attention(queries, keys, values, bias, scale)
    hidden = hidden + linear(attended.transpose(1, 2).flatten(2), o_proj)
    x = rms_norm(hidden, norm2, eps)
    return hidden + linear(F.silu(linear(x, gate)) * linear(x, up), down), keys, values


def linear(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    """x W^T + b for a (weight, bias) pair, or through an int8 weight packed by `int8_weights`."""
    if isinstance(weights, Int8Linear):
        return weights(x)
    return F.linear(x, *weights)


class Int8Linear:
    """A frozen linear layer with int8 weights (one scale per output row) and dynamically quantized
    int8 activations (one scale per call), through PyTorch's fbgemm kernel: on a CPU without native
    bf16 (AVX2) its int8 products run about 1.5-2x the float32 matmul at SmolLM2's shapes (benchmarks
    in docs/speed.md). For scoring only: nothing flows back through it.

    By hand because torch.ao's `quantize_dynamic` swaps `nn.Linear` modules, and the layer functions
    here multiply weight tensors. PyTorch 2.13 deprecates these quantized tensors (torchao is their
    successor) and warns once when one is made; the setting is off in every preset."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(
            quantized, None if bias is None else bias.detach().float()
        )
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, which fbgemm's AVX2 kernel needs to avoid overflowing its
        # 16-bit intermediate sums
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


def int8_weights(weights: list[tuple]) -> list[tuple]:
    """`layer_weights` with each layer's seven linears as `Int8Linear`; the norms stay as they are."""
    return [
        tuple(Int8Linear(*item) if isinstance(item, tuple) else item for item in layer) for layer in weights
    ]


def attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(queries keys^T * scale + bias) values, each key/value head serving heads // kv_heads
    query heads. (B, heads, T, head_dim), (B, kv_heads, S, head_dim) twice, bias (B, 1, T, S). On a CPU
    as two batched matmuls and a float32 softmax (`_attention_by_matmuls`); elsewhere through SDPA."""
    if queries.device.type == "cpu":
        return _attention_by_matmuls(queries, keys, values, bias, scale)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=scale, enable_gqa=True)


@torch.compiler.disable  # inside the compiled layer inductor's softmax kernel ran slower than SDPA
def _attention_by_matmuls(queries, keys, values, bias, scale) -> torch.Tensor:
    """PyTorch's CPU flash-attention kernel ran the engine's attention at under 100 GFLOP/s on the AMD
    EPYC machine; two bf16 matmuls and a softmax took the engine's scoring from 43 to 35 s a 1,024-row
    sample there (README, Speed)."""
    batch, heads, length, head_dim = queries.shape
    groups, seen = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(batch, groups, heads // groups * length, head_dim)
    scores = (grouped @ keys.transpose(-1, -2)).view(batch, heads, length, seen)
    weights = (scores.float() * scale + bias).softmax(-1).to(values.dtype)
    return (weights.view(batch, groups, -1, seen) @ values).view(batch, heads, length, head_dim)


_compiled: dict[str, object] = {}


def _compiled_layer():
    if "layer" not in _compiled:
        _compiled["layer"] = torch.compile(decoder_layer, dynamic=True)
    return _compiled["layer"]


LAYER_TYPES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")  # the blocks `decoder_layer` computes


def layer_weights(decoder: torch.nn.Module) -> list[tuple] | None:
    """Each layer's weights in `decoder_layer`'s order, where the decoder is a Llama or Qwen2 decoder
    whose layers can run as `decoder_layer` (plain or merged-LoRA linears, full attention); None
    otherwise. Read them while the LoRA weights are merged: they are the tensors scoring multiplies by."""
    layers = getattr(decoder, "layers", None)
    if not (layers and hasattr(decoder, "rotary_emb") and hasattr(getattr(decoder, "norm", None), "weight")):
        return None
    if not all(type(layer).__name__ in LAYER_TYPES for layer in layers):
        return None
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in layers):
        return None  # a windowed layer sees fewer keys than `decoder_layer` gives it
    weights = [_weights(layer) for layer in layers]
    return None if any(w is None for w in weights) else weights


def _weights(layer: torch.nn.Module) -> tuple | None:
    """The layer's norms and (weight, bias) pairs in `decoder_layer`'s order; None where a linear is
    not a plain one."""
    attention, mlp = layer.self_attn, layer.mlp
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
    linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    pairs = [_plain_linear(linear) for linear in linears]
    if any(p is None for p in pairs) or type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        return None
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return (norms[0], *pairs[:4], norms[1], *pairs[4:])


def _plain_linear(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias or None) of a linear: its own, or a LoRA layer's base layer's once merged (or
    switched off); LoRA leaves the bias as it is."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    if type(base) is not torch.nn.Linear:
        return None
    if base is not linear and not (linear.merged or linear.disable_adapters):
        return None  # LoRA that would run beside the base weight
    return base.weight, base.bias


def answer_hidden(
    decoder: torch.nn.Module,
    weights: list[tuple[torch.Tensor, ...]],
    prefix: tuple[torch.Tensor, torch.Tensor],
    suffix: tuple[torch.Tensor, torch.Tensor],
    owner: torch.Tensor,
    compiled: bool = True,
) -> torch.Tensor:
    """The decoder's final hidden state at each suffix's last position, with its layers' `weights`
    (`layer_weights`). `prefix` is (embeddings (P, Tp, d), attention mask (P, Tp)) and `suffix`
    likewise (S, Ts), both left-padded; suffix s continues prefix owner[s]. -> (S, d)"""
    if compiled and not _compiled.get("failed"):
        try:
            return _run_layers(_compiled_layer(), decoder, weights, prefix, suffix, owner)
        except compile_errors() as error:
            _compiled["failed"] = True
            warn_uncompiled(error, "scoring", "compile_scoring")
    return _run_layers(decoder_layer, decoder, weights, prefix, suffix, owner)


def _run_layers(layer, decoder, weights, prefix, suffix, owner) -> torch.Tensor:
    (prefix_hidden, prefix_mask), (suffix_hidden, suffix_mask) = prefix, suffix
    # the suffix's positions carry on from its prefix's last real token, as in one unpadded prompt
    suffix_positions = prefix_mask.sum(-1, keepdim=True)[owner] + positions_from_mask(suffix_mask)
    prefix_rotary = decoder.rotary_emb(prefix_hidden, positions_from_mask(prefix_mask))
    suffix_rotary = decoder.rotary_emb(suffix_hidden, suffix_positions)
    sees_prefix = prefix_mask[owner].bool()[:, None, None, :].expand(-1, 1, suffix_mask.shape[1], -1)
    prefix_bias = _bias(_causal(prefix_mask), prefix_hidden.dtype)
    suffix_bias = _bias(torch.cat([sees_prefix, _causal(suffix_mask)], dim=-1), suffix_hidden.dtype)
    last = len(weights) - 1
    for index, (module, matrices) in enumerate(zip(decoder.layers, weights, strict=True)):
        # in the last layer the prefixes give only keys and values, and a suffix only its answer position
        settings = (
            matrices,
            module.input_layernorm.variance_epsilon,
            module.self_attn.scaling,
            index == last,
        )
        prefix_hidden, keys, values = layer(prefix_hidden, *prefix_rotary, prefix_bias, None, None, *settings)
        suffix_hidden, _, _ = layer(
            suffix_hidden, *suffix_rotary, suffix_bias, keys[owner], values[owner], *settings
        )
    return decoder.norm(suffix_hidden[:, -1])


def _causal(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padded mask -> (B, 1, T, T): each position sees the real positions up to itself,
    and itself (a padding position must see something, or its attention would be NaN)."""
    length = mask.shape[1]
    order = torch.arange(length, device=mask.device)
    causal = order[None, :] <= order[:, None]  # (T, T): key <= query
    seen = causal[None] & mask.bool()[:, None, :]
    return (seen | torch.eye(length, dtype=torch.bool, device=mask.device)[None])[:, None]


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Which keys each query sees (bool) -> the attention's additive bias: 0 there, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
