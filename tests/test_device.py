"""Process settings from ccfllm.device: malloc that keeps freed activation memory for reuse."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from ccfllm import device

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MALLINFO2 = GLIBC and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 33)


class RecordingLibc:
    """A stand-in for libc that records the mallopt calls made on it."""

    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.answer


def test_keep_freed_memory_sets_both_malloc_thresholds(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert device.keep_freed_memory() is True
    # M_MMAP_THRESHOLD (-3) at glibc's largest value, M_TRIM_THRESHOLD (-1) at 256 MB
    assert libc.calls == [(-3, 32 << 20), (-1, 256 << 20)]


def test_keep_freed_memory_says_false_where_malloc_refuses_or_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: RecordingLibc(answer=0))
    assert device.keep_freed_memory() is False

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert device.keep_freed_memory() is False


# In a fresh process: a 20 MB block, above glibc's default mmap threshold (128 KB) and below the one
# keep_freed_memory sets (32 MB), is mapped on its own (mallinfo's hblkhd grows by it) with the
# defaults, and served from the heap (which keeps it after free) with the setting in effect.
MAPPED_BYTES = """
import ctypes, sys
from ccfllm.device import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
if sys.argv[1] == "kept":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_bytes(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", MAPPED_BYTES, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not MALLINFO2, reason="glibc 2.33+ (mallinfo2) only")
def test_with_the_setting_in_effect_a_20_mb_block_comes_from_the_heap_not_its_own_mapping():
    assert _mapped_bytes("default") >= 20 << 20
    assert _mapped_bytes("kept") == 0
