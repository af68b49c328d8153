"""The speed tricks around the LLM, apart from loading it (llm.py): LoRA dropout drawn by gaps
(GapDropout), LoRA merged into its base layers for scoring (merged_lora), eager attention for
training on CPU, the decoder's layers compiled for training (run_compiled), and the output layer's
float32 copy kept between calls. Each leaves the figures as they were (within float rounding, where
it says so) and was kept for what it measured on this CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

T = TypeVar("T")


def lora_dropouts(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleDict]]:
    """(name, its adapters' dropout layers) of each LoRA layer in `model`."""
    found = [(name, getattr(module, "lora_dropout", None)) for name, module in model.named_modules()]
    return [(name, dropouts) for name, dropouts in found if isinstance(dropouts, torch.nn.ModuleDict)]


def use_gap_dropout(model: PeftModel, targets: list[str]) -> None:
    """Put a GapDropout in place of each of peft's LoRA dropout layers (same p, same distribution)."""
    for name, dropouts in lora_dropouts(model):
        leaf = name.rsplit(".", 1)[-1]
        stream = targets.index(leaf) if leaf in targets else 0
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[adapter] = GapDropout(dropout.p, stream)


@torch.library.custom_op(
    "ccfllm::dropout_keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def dropout_keep_mask(like: torch.Tensor, p: float, stream: int) -> torch.Tensor:
    """A bool mask shaped like `like` that drops each position independently with probability p.

    The positions dropped are drawn, not a uniform per position: the gaps between independent
    Bernoulli(p) successes are Geometric(p), so this takes about p * n random draws where
    `nn.Dropout` takes n (with p = 0.05, a twentieth). On this CPU the generator's draws were most
    of the cost of LoRA dropout: 2.5 ms of a (8, 124, 576) mask, two masks a layer.
    `stream` tells apart the masks of different modules that drop the same input (LoRA's q and v):
    a compiled graph would otherwise take two calls with equal arguments for one.
    """
    total = like.numel()
    chunk = _draws_per_chunk(total, p)

    def dropped_after(start: torch.Tensor | float) -> torch.Tensor:  # the next `chunk` positions dropped
        gaps = torch.empty(chunk, dtype=torch.float64, device=like.device).geometric_(p)
        return gaps.cumsum_(0).add_(start)

    dropped = dropped_after(-1.0)
    while dropped[-1].item() < total:  # draw on until a position past the end
        dropped = torch.cat([dropped, dropped_after(dropped[-1])])
    inside = int(torch.searchsorted(dropped, float(total)))  # positions are increasing
    keep = torch.ones(total, dtype=torch.bool, device=like.device)
    keep.index_fill_(0, dropped[:inside].long(), False)
    return keep.view(like.shape)


def _draws_per_chunk(total: int, p: float) -> int:
    """Gaps drawn at a time: the mean number of drops plus six standard deviations, so that one chunk
    nearly always reaches past the end."""
    return int(total * p + 6 * math.sqrt(total * p) + 16)


@dropout_keep_mask.register_fake
def _(like: torch.Tensor, p: float, stream: int) -> torch.Tensor:
    return torch.empty_like(like, dtype=torch.bool)


class GapDropout(torch.nn.Module):
    """LoRA's dropout, as `nn.Dropout(p)` computes it, with the mask drawn by `dropout_keep_mask` on
    CPU (other devices draw theirs as `nn.Dropout` does, which is fast there)."""

    def __init__(self, p: float, stream: int = 0):
        super().__init__()
        self.p, self.stream = p, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_keep_mask(x.detach(), self.p, self.stream) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"


@contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[None]:
    """Within this block each LoRA layer of `model` runs as one linear layer with W + scale * B A.

    For scoring: an unmerged layer runs its input through A and B in float32 beside the base layer, and
    merging made scoring the test sample about 10% faster here. The sum is taken in float32 and stored
    in the base layer's dtype; the original weights are kept and put back afterwards, bit for bit, so
    training goes on from exactly where it was. A layer already merged, switched off, or with DoRA is
    left alone.
    Memory: a copy of each adapted weight while the block runs (q and v: 2 GB for a 7B Llama in bf16).
    """
    originals = []
    try:
        for layer in filter(_mergeable, model.modules()):
            weight = layer.get_base_layer().weight
            adapters = [name for name in layer.active_adapters if name in layer.lora_A]
            delta = sum(layer.get_delta_weight(name).float() for name in adapters)
            originals.append((layer, weight.data))
            weight.data = (weight.data.float() + delta).to(weight.dtype)
            layer.merged_adapters = adapters
        yield
    finally:
        for layer, original in originals:
            layer.get_base_layer().weight.data = original
            layer.merged_adapters = []


def _mergeable(layer: torch.nn.Module) -> bool:
    """A plain LoRA linear layer whose adapters run: not merged yet, not switched off, not DoRA."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear):
        return False
    return not (layer.merged or layer.disable_adapters or any(layer.use_dora.values()))


@contextmanager
def attention_for_training(model: PreTrainedModel) -> Iterator[None]:
    """Within this block a CPU model (a causal LM or its decoder) runs its attention in the eager form.

    PyTorch's CPU flash-attention kernel (what `sdpa` runs here) is fast forward but its backward took
    nine times its forward: eager attention made a training step of the default LLM about 20% faster
    on this machine with gradients as close to float32's (cosine 0.993 against sdpa's 0.992 in bf16).
    Blocks without gradients (scoring: see `scoring_layers.attention` for its attention on CPU), other
    devices and other attention implementations are left as they are.
    """
    loaded = model.config._attn_implementation
    if model.device.type != "cpu" or loaded != "sdpa" or not torch.is_grad_enabled():
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(loaded)


def run_compiled(decoder: torch.nn.Module, run: Callable[[], T]) -> T:
    """`run()`, with the decoder's layers compiled by torch.compile while it runs, where gradients are
    recorded; without them, or where compiling fails (no C++ compiler, say), `run()` as it is.

    Each layer is compiled alone ("regional" compilation): the layers share one graph, compiled once
    for any sequence length, in 30-45 s here where the whole model took 218 s. The compiled layers
    fuse the element-wise work (norms, rotary embedding, softmax, dtype conversions) that took more
    than half of a training step of the default LLM on this CPU. Scoring, which runs without
    gradients and with a key/value cache, keeps the layers as they are.
    """
    layers = getattr(decoder, "layers", None)
    usable = isinstance(layers, torch.nn.ModuleList) and not getattr(decoder, "_compile_failed", False)
    if not (usable and torch.is_grad_enabled()):
        return run()
    compiled = decoder.__dict__.get("_compiled_layers")
    if compiled is None:
        compiled = [torch.compile(layer, dynamic=True) for layer in layers]
        decoder.__dict__["_compiled_layers"] = compiled
    originals = list(layers)
    try:
        for index, layer in enumerate(compiled):
            layers[index] = layer
        return run()
    except compile_errors() as error:
        decoder._compile_failed = True
        warn_uncompiled(error, "training", "compile_training")
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return run()


def warn_uncompiled(error: Exception, work: str, setting: str) -> None:
    """The one warning given where torch.compile failed and `work` goes on uncompiled."""
    warnings.warn(
        f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        f"{work} goes on with the layers uncompiled (set {setting}=false to skip compiling).",
        stacklevel=3,
    )


def compile_errors() -> type[Exception]:
    """What torch.compile raises where it cannot compile (imported late: torch._dynamo is slow)."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError is one

    return BackendCompilerFailed


def float32_output_weight(head: torch.nn.Module) -> torch.Tensor:
    """The output layer's (V, d) weight in float32, for logits that keep their precision.

    A frozen bf16 weight is converted once and the copy is kept on the layer: converting the whole
    (V, d) matrix on every call took up to 0.16 s of a 1.2-1.6 s training step of the default LLM on
    this CPU (profiled), and the same conversion ran once per scoring batch.
    The copy is made again whenever the weight is moved or changed in place, and a weight that trains
    is converted on every call so that gradients reach it.
    """
    weight = head.weight
    if weight.dtype == torch.float32 or weight.requires_grad:
        return weight.float()
    key = (weight.data_ptr(), weight.device, weight._version)
    cached = getattr(head, "_float32_weight", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().float())
        head._float32_weight = cached
    return cached[1]
