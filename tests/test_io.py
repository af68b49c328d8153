"""Output places checked before any work, and weights files read with one clear error."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from ccfllm.errors import CCFLLMError, CheckpointError
from ccfllm.io import atomic_path, check_writable, make_folder, read_safetensors


@pytest.fixture
def a_file(tmp_path):
    """A plain file: no folder can be made under it, whoever runs the tests (root included)."""
    path = tmp_path / "a-file"
    path.write_text("mine")
    return path


def test_an_output_under_a_file_is_refused_before_any_work(a_file, tmp_path):
    for out in (a_file / "run", a_file / "deeper" / "run"):
        with pytest.raises(CCFLLMError, match=f"Cannot write to {a_file}.*Choose another output path"):
            check_writable(out)
        with pytest.raises(CCFLLMError, match="Cannot write to"):
            with atomic_path(out) as tmp:
                tmp.write_text("never")
        with pytest.raises(CCFLLMError, match="Cannot write to"):
            make_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and a_file.read_text() == "mine"


def test_a_writable_place_passes_and_the_check_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "run")
    assert list(tmp_path.iterdir()) == []  # the folders it made to try are gone again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_output_in_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(CCFLLMError, match=f"Cannot write to {locked}"):
        check_writable(locked / "run")


def test_weights_that_are_not_safetensors_are_refused_never_unpickled(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2)}, good)
    assert read_safetensors(good)["w"].tolist() == [1.0, 1.0]
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.ones(2)}, pickle)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-4])
    for path in (pickle, garbage, truncated):
        with pytest.raises(CheckpointError, match=f"{path.name} is truncated, corrupt or not safetensors"):
            read_safetensors(path)
    with pytest.raises(CheckpointError, match="missing.safetensors is missing"):
        read_safetensors(tmp_path / "missing.safetensors")
