"""A stage's saved progress: the round trip of a loop's state, and files that cannot be read."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from ccfllm.errors import CheckpointError
from ccfllm.io import atomic_path
from ccfllm.partial import load_progress, loop_state, restore_loop_state, save_progress


def trained_linear(seed: int) -> tuple[torch.nn.Linear, torch.optim.Adam]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 2)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        layer(torch.randn(4, 3)).square().sum().backward()
        optimiser.step()
    return layer, optimiser


def test_a_loop_state_round_trip_restores_weights_moments_and_random_numbers(tmp_path):
    layer, optimiser = trained_linear(0)
    tensors, groups = loop_state(list(layer.parameters()), optimiser)
    save_progress(tmp_path / "s.progress.safetensors", tensors, {"optimiser": groups, "step": 3})
    expected_draw = torch.rand(3)

    other, other_optimiser = trained_linear(1)  # another state everywhere
    saved, record = load_progress(tmp_path / "s.progress.safetensors")
    restore_loop_state(saved, record["optimiser"], list(other.parameters()), other_optimiser)
    assert record["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), layer.parameters(), strict=True))
    for restored, original in zip(other.parameters(), layer.parameters(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(other_optimiser.state[restored][key], optimiser.state[original][key])
    assert torch.equal(torch.rand(3), expected_draw)  # the global generator goes on as it would have


def test_no_progress_is_none_and_an_unreadable_file_one_clear_error(tmp_path):
    assert load_progress(None) is None and load_progress(tmp_path / "absent.safetensors") is None
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    save_file({"a": torch.zeros(2)}, tmp_path / "no-record.safetensors")
    for name in ("garbage.safetensors", "no-record.safetensors"):
        with pytest.raises(CheckpointError, match="cannot be read .*: delete it to redo that stage"):
            load_progress(tmp_path / name)
        assert (tmp_path / name).exists()  # nothing is deleted for the user


def test_progress_of_other_weights_is_refused(tmp_path):
    layer, optimiser = trained_linear(0)
    tensors, groups = loop_state(list(layer.parameters()), optimiser)
    with pytest.raises(CheckpointError, match="holds other weights than the stage trains"):
        restore_loop_state(tensors, groups, [layer.weight], optimiser)


def test_kept_files_and_folders_get_the_umask_permissions_not_the_writers(tmp_path):
    """safetensors writes files only their owner can read; what atomic_path renames into place gets
    what the umask gives new files (here 640: group-readable), so a shared run folder can be read."""
    previous = os.umask(0o027)
    try:
        save_progress(tmp_path / "s.progress.safetensors", {"a": torch.zeros(2)}, {"step": 1})
        with atomic_path(tmp_path / "part") as folder:
            folder.mkdir()
            save_file({"a": torch.zeros(2)}, folder / "weights.safetensors")
    finally:
        os.umask(previous)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [*tmp_path.iterdir(), tmp_path / "part/weights.safetensors"]
    }
    assert modes == {"s.progress.safetensors": 0o640, "part": 0o750, "weights.safetensors": 0o640}
