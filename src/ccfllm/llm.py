"""Any Hugging Face causal LM, loaded for scoring and LoRA tuning: answer tokens, checks, LoRA.

Where the weights come from (the embedded default, a split model, a GGUF, a folder, a hub id) is
llm_source.py; the speed tricks applied to a loaded model are llm_speed.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from .config import LORA_LAYERS
from .device import resolve_device, resolve_dtype
from .errors import CCFLLMError
from .llm_source import EMBEDDED_LLM, model_source
from .llm_speed import use_gap_dropout

if TYPE_CHECKING:
    from peft import PeftModel


# The attention projections LoRA adapts, under the names each family gives them; the first set a
# model has wins. q/v follow LoRA's paper; fused qkv layers are adapted whole.
LORA_TARGETS = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen2/3, Gemma, OPT, GPT-J, GPT-Neo, Phi-1/2, StableLM
    ("c_attn",),  # GPT-2, GPT-BigCode (StarCoder), Qwen-1 (Conv1D or Linear)
    ("query_key_value",),  # GPT-NeoX (Pythia), Falcon, BLOOM, ChatGLM
    ("qkv_proj",),  # Phi-3, CodeGen
    ("Wqkv",),  # MPT, DBRX, early remote-code Phi
    ("W_pack",),  # Baichuan
    ("wqkv",),  # InternLM2
    ("att_proj",),  # OLMo-1
    ("query", "value"),  # BERT-style decoders
)


@dataclass
class LoadedLLM:
    model: PreTrainedModel  # a causal LM in eval mode, on its device and dtype
    tokenizer: PreTrainedTokenizerBase  # left padding, with a pad token
    name: str  # what was asked for: EMBEDDED_LLM, a folder or a hub id
    fingerprint: dict  # what a saved run records, to refuse another LLM on reload
    yes_id: int
    no_id: int

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


def load_llm(
    name: str = EMBEDDED_LLM,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    allow_download: bool = False,
) -> LoadedLLM:
    """Load `name` for scoring and LoRA tuning, on `device` in `dtype` ('auto': bf16 where native).

    `name` is EMBEDDED_LLM, an installable split model (`split_gguf.SPLIT_MODELS`: 'qwen2.5-1.5b'), a
    model folder (or a folder or path holding one .gguf file), or a hub id, which is fetched only with
    `allow_download`. De-quantized GGUFs are cached under `cache_dir`.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, local = model_source(name, cache_dir, allow_download, torch_dtype)
    _check_causal_lm(source, local)
    tokenizer = _load_tokenizer(source, local)
    model = _load_model(source, local, torch_dtype, torch_device).eval()
    yes_id, no_id = answer_token_ids(tokenizer)
    _check_ids_in_vocabulary(model, tokenizer, (yes_id, no_id))
    return LoadedLLM(model, tokenizer, name, _fingerprint(name, model), yes_id, no_id)


def answer_token_ids(
    tokenizer: PreTrainedTokenizerBase, answers: tuple[str, str] = ("Yes", "No"), after: str = "#Answer:"
) -> tuple[int, int]:
    """The single token of each answer as it follows the prompt's end `after`.

    That is ' Yes' (Ġ-prefixed) in a GPT-2 style BPE and '▁Yes' in sentencepiece; the bare word's
    token where the spaced form is not one token.
    """
    ids = tuple(_single_answer_token(tokenizer, answer, after) for answer in answers)
    if len(set(ids)) != len(ids):
        raise CCFLLMError(
            f"The answers {answers} map to the same token {ids[0]} in the {_describe(tokenizer)}."
        )
    return ids


def lora_target_modules(model: torch.nn.Module, which: str = "attention") -> list[str]:
    """The layers LoRA adapts. 'attention': the attention projections, q/v for Llama-like models,
    the fused or named equivalents for other architectures. 'all-linear': every linear layer but the
    output layer (on Llama: q, k, v, o and the MLP's gate, up and down)."""
    if which not in LORA_LAYERS:
        raise CCFLLMError(f"LoRA targets must be one of {list(LORA_LAYERS)}, got {which!r}.")
    linear_names = _linear_layer_names(model)
    if which == "all-linear":
        output = _output_layer_name(model)
        inner = sorted(name for name in linear_names if name != output)
        if not inner:
            raise CCFLLMError("This model has no linear layer besides its output layer for LoRA to adapt.")
        return inner
    for targets in LORA_TARGETS:
        if set(targets) <= linear_names:
            return list(targets)
    raise CCFLLMError(
        f"No known attention projection among this model's linear layers {sorted(linear_names)}; "
        "set lora_targets=all-linear to adapt all of them but the output layer."
    )


def add_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
) -> PeftModel:
    """Wrap `model` with LoRA adapters (peft); afterwards only the adapter weights are trainable.

    The model is changed in place. peft keeps the adapters in float32 even on a bf16 model.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model) if target_modules is None else list(target_modules),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; the warning is theirs.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        wrapped = get_peft_model(model, config)
    use_gap_dropout(wrapped, sorted(config.target_modules))
    return wrapped


# -- where a model comes from -------------------------------------------------------------------


# -- loading and checking -----------------------------------------------------------------------


def _check_causal_lm(source: Path | str, local: bool) -> None:
    """One clear error for a folder that is not a causal LM (an encoder, a sentence model, no config)."""
    if local and not (Path(source) / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in Path(source).iterdir())[:10]) or "nothing"
        raise CCFLLMError(
            f"{source} holds no config.json (found: {found}); expected a Hugging Face causal LM folder "
            "(config.json, weights, tokenizer) or a single .gguf file."
        )
    config = _read_config(source, local)
    if not _is_causal_lm(config):
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
        raise CCFLLMError(
            f"{source} holds a {config.model_type!r} model ({architectures}), which is not a causal language "
            "model; CCF-LLM needs a decoder LM such as Llama, Mistral, Qwen or GPT-2 (a ...ForCausalLM)."
        )


def _read_config(source: Path | str, local: bool) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError) as exc:
        raise CCFLLMError(f"transformers cannot read the model config of {source}: {exc}") from exc


def _is_causal_lm(config: PreTrainedConfig) -> bool:
    """A config naming a causal-LM class; one naming no class must be a decoder model type."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return bool(set(architectures) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))
    # BERT-like types also have an LM-head class, but are encoders unless the config says decoder
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder


def _load_tokenizer(source: Path | str, local: bool) -> PreTrainedTokenizerBase:
    """The model's tokenizer with left padding (the answer is read at the last position) and a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError) as exc:
        raise CCFLLMError(f"Could not load the tokenizer of {source}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CCFLLMError(f"The tokenizer of {source} has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_model(source: Path | str, local: bool, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The weights, read straight onto `device` (a 7B model never passes through CPU memory on a GPU)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device, local_files_only=local
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CCFLLMError(f"Could not load the causal LM weights from {source}: {exc}") from exc


def _check_ids_in_vocabulary(model: PreTrainedModel, tokenizer, ids: tuple[int, ...]) -> None:
    vocab_size = model.get_input_embeddings().num_embeddings
    if max(ids) >= vocab_size:
        raise CCFLLMError(
            f"The {_describe(tokenizer)} gives answer tokens {ids}, beyond the model's vocabulary of "
            f"{vocab_size}: the tokenizer does not belong to this model."
        )


def _fingerprint(name: str, model: PreTrainedModel) -> dict:
    embeddings = model.get_input_embeddings()
    return {
        "name": name,
        "model_type": model.config.model_type,
        "hidden_size": embeddings.embedding_dim,
        "vocab_size": embeddings.num_embeddings,
        "n_layers": getattr(model.config, "num_hidden_layers", None),
    }


# -- small helpers ------------------------------------------------------------------------------


def _single_answer_token(tokenizer: PreTrainedTokenizerBase, answer: str, after: str) -> int:
    candidates = [_continuation(tokenizer, after, " " + answer), _encode(tokenizer, answer)]
    for tokens in candidates:
        if len(tokens) == 1 and tokens[0] != tokenizer.unk_token_id:
            return tokens[0]
    raise CCFLLMError(
        f"The {_describe(tokenizer)} gives no single token for the answer {answer!r} after {after!r} "
        f"(got {candidates}); CCF-LLM reads p(Yes) and p(No) from single answer tokens."
    )


def _continuation(tokenizer: PreTrainedTokenizerBase, prefix: str, text: str) -> list[int]:
    """The tokens that `text` adds after `prefix`; all of them where the prefix's tokens change."""
    head = _encode(tokenizer, prefix)
    whole = _encode(tokenizer, prefix + text)
    return whole[len(head) :] if whole[: len(head)] == head else whole


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _describe(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'built in code'})"


def _output_layer_name(model: torch.nn.Module) -> str | None:
    """The last name part of the layer that maps hidden states to the vocabulary, if the model has one."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:
        return None
    return next((name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is output), None)


def _linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Last name parts of the model's linear layers; GPT-2's Conv1D counts as one (a transposed Linear)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }
