"""Process settings from ccfllm.device: malloc that keeps freed activation memory for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A SmolLM2 MLP on 32 prompts of 116 tokens, 20 times: its activations (11 MB each) are allocated and
# freed as in a forward pass. Prints the page faults that took: with glibc's defaults the freed memory
# goes back to the system and each new activation faults its pages in afresh.
FAULTS = """
import resource, sys, torch
import torch.nn.functional as F
from ccfllm.device import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
x = torch.randn(32, 116, 576, dtype=torch.bfloat16)
up, down = torch.randn(1536, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    out = F.linear(F.silu(F.linear(x, up)) * F.linear(x, up), down)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_is_reused_without_page_faults():
    default, kept = _page_faults("default"), _page_faults("kept")
    assert default > 20 * 2800  # at least one activation's 2,800 pages faulted in per pass
    assert kept < default / 4
