"""Device and dtype from one place, so the same code runs on a laptop CPU and a GPU."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import torch

from .errors import CCFLLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CCFLLMError(f"Unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CCFLLMError(
            f"Device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu."
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 where the device computes it natively, float32 otherwise."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise CCFLLMError(f"Unknown dtype {name!r}; choose one of {['auto', *DTYPES]}.")
    return DTYPES[name]


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_kind() -> str:
    """The CPU in a few words, with what decides its speed here: the vector instructions torch uses and
    whether bf16 is native. E.g. 'AMD EPYC, AVX2 (no native bf16: float32), 2 threads'."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "CPU")
    if "amx_bf16" in info:
        arithmetic = "AMX (native bf16)"
    elif "avx512_bf16" in info:
        arithmetic = "AVX-512 bf16 (native bf16)"
    else:
        arithmetic = f"{torch.backends.cpu.get_cpu_capability()} (no native bf16: float32)"
    return f"{name}, {arithmetic}, {torch.get_num_threads()} threads"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# glibc's malloc serves blocks above its mmap threshold with fresh pages and returns freed memory at the
# heap's top to the system; a forward pass on the CPU allocates and frees activations of a few MB to
# tens of MB many times a second, so each one page-faults its memory in again. Measured here with these
# limits: a SmolLM2 MLP on 32 prompts ran 2.2x faster (804 -> 1,805 GFLOP/s), and scoring 256 test rows
# took 13.7 s instead of 15.7 s (1.5 M page faults -> 47 k).
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD = 256 << 20  # freed memory the process keeps for reuse


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed activation memory instead of faulting in fresh pages each time.

    Process-wide and harmless elsewhere: does nothing (and returns False) without glibc, e.g. on macOS.
    The command line calls it; call it yourself when scoring or training on a CPU from Python.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - musl's libc.so.6, if any, would lack it
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    return bool(mmap_set and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
