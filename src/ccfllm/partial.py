"""An interrupted run's finished parts: the folder OUT.partial that keeps them until the run is done,
the check that a resumed run has the settings and data of the one that started it, a finished part
(`save_part`: its record, weights, tensors and the random-number state it ends with, so that a
resumed run goes on exactly as an unbroken one), and a training loop's state part-way through a
stage (`save_progress`), so that a stage resumes from its last checkpoint rather than from its start.

A finished part is a folder of
  part.json           its JSON record (what it measured, its timings, losses)
  state.safetensors   its tensors (test scores, say) and the random-number state after it
  NAME.safetensors... the weights it trained, as the run writes them
Parts left by an earlier version are read too: CCF-LLM's stages kept the record in stage.json,
A-LLMRec's parts the random-number state in random_state.safetensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import to_dict
from .data.dataset import CTRDataset, refuse_other_dataset
from .distributed import SINGLE, World
from .errors import CheckpointError
from .io import atomic_path, make_folder, read_safetensors, write_json
from .run_folder import require_file


def partial_folder(out: str | Path) -> Path:
    """Where the run that will write `out` keeps its finished parts until it is done."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def open_partial_folder(
    out: Path, config, dataset: CTRDataset, resume: bool, overwrite: bool, world: World = SINGLE
) -> Path:
    """OUT.partial: continued when `resume` (refused if its settings or data differ), else started
    afresh; refused when it exists and neither `resume` nor `overwrite` says what to do with it.
    Every rank checks; only rank 0 makes or clears it, after all have looked."""
    work = partial_folder(out)
    record = {"config": to_dict(config), "dataset": dataset.fingerprint()}
    exists = work.exists()
    if exists and resume:
        _check_same_run(work, record, dataset)
    elif exists and not overwrite:
        raise CheckpointError(
            f"{work} holds the finished parts of an interrupted run: pass --resume to continue it, "
            "or --overwrite to start over."
        )
    world.barrier()  # every rank has seen the folder as it was
    if world.is_main and not (exists and resume):
        if exists:
            shutil.rmtree(work)
        make_folder(work)
        write_json(work / "config.json", record)
    world.barrier()  # and rank 0 has made it
    return work


def _check_same_run(work: Path, record: dict, dataset: CTRDataset) -> None:
    try:
        saved = json.loads((work / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{work}/config.json cannot be read ({exc}), so the interrupted run cannot be checked: "
            f"delete {work}, or pass --overwrite without --resume to start over."
        ) from exc
    refuse_other_dataset(work, saved["dataset"], dataset)
    differ = {
        key: (saved["config"].get(key), value)
        for key, value in record["config"].items()
        if saved["config"].get(key) != value
    }
    if differ:
        shown = ", ".join(f"{key}: {was!r} there, {now!r} now" for key, (was, now) in sorted(differ.items()))
        raise CheckpointError(
            f"{work} was started with other settings ({shown}): resume with the same settings, "
            "or pass --overwrite without --resume to start over."
        )


def drop_if_nothing_finished(work: Path, finished: Iterable[Path]) -> None:
    """Keep an interrupted run's folder only if one of its `finished` parts (folders, or a stage's
    progress file) exists."""
    if not any(path.exists() for path in finished):
        shutil.rmtree(work, ignore_errors=True)


def random_state(device: torch.device, world: World = SINGLE) -> dict[str, torch.Tensor]:
    """torch's random-number state (and the GPU's, on CUDA), to save beside a finished part; in a
    data-parallel run every rank's (each draws its own dropout), gathered for rank 0 to save."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return world.gather_named(state)


def restore_random_state(state: dict[str, torch.Tensor], device: torch.device, world: World = SINGLE) -> None:
    state = world.own_named(state, ["rng", "rng_cuda"])
    torch.set_rng_state(state["rng"])
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)


# -- a finished part ---------------------------------------------------------------------------------

PART_RECORD, PART_STATE = "part.json", "state.safetensors"
EARLIER_RECORD, EARLIER_STATE = "stage.json", "random_state.safetensors"  # before one part format


def save_part(
    folder: Path,
    record: dict,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    write_weights: Callable[[Path], None] | None = None,
    world: World = SINGLE,
) -> None:
    """A finished part, atomically: its JSON `record`, its `tensors`, the weights `write_weights` puts
    in the folder, and, where it drew random numbers (`device` given), the random-number state after
    it (every rank's, gathered: every rank calls; rank 0 writes)."""
    state = {name: value.contiguous() for name, value in (tensors or {}).items()}
    if device is not None:
        state.update(random_state(device, world))
    if not world.is_main:
        return
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if write_weights is not None:
            write_weights(tmp)
        if state:
            save_file(state, tmp / PART_STATE)
        write_json(tmp / PART_RECORD, record)


def read_part(
    folder: Path, device: torch.device | None = None, world: World = SINGLE
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of a finished part; with `device`, its random-number state is put back, so
    that the run goes on as it would have after the part."""
    tensors = {}
    if device is not None:
        tensors = read_safetensors(require_file(_either(folder, PART_STATE, EARLIER_STATE)))
        restore_random_state(tensors, device, world)
    record = json.loads(require_file(_either(folder, PART_RECORD, EARLIER_RECORD)).read_text())
    return record, tensors


def _either(folder: Path, name: str, earlier_name: str) -> Path:
    """folder/name, or the file of `earlier_name` where only an earlier version's part has one."""
    path, earlier = folder / name, folder / earlier_name
    return earlier if not path.exists() and earlier.exists() else path


# -- a stage part-way: its loop's state at its last checkpoint ----------------------------------------


def progress_file(part: Path) -> Path:
    """Where a training loop keeps its state part-way through the stage that will become `part`."""
    return part.with_name(part.name + ".progress.safetensors")


def save_progress(path: Path, tensors: dict[str, torch.Tensor], record: dict) -> None:
    """A training loop's state: its `tensors` (weights, optimiser moments, random-number states) and
    its JSON-able `record`, in one safetensors file (the record as its metadata) that replaces the
    previous one atomically, so that an interruption leaves either the old state or the new one."""
    with atomic_path(path) as tmp:
        contiguous = {name: value.detach().contiguous() for name, value in tensors.items()}
        save_file(contiguous, tmp, metadata={"record": json.dumps(record)})


def load_progress(path: Path | None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, record) that `save_progress` wrote at `path`, or None where there is none."""
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as saved:
            record = json.loads(saved.metadata()["record"])
            return {name: saved.get_tensor(name) for name in saved.keys()}, record
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:  # TypeError: no metadata
        raise CheckpointError(
            f"{path} (a stage's saved progress) cannot be read ({exc}): delete it to redo that stage "
            "from its start."
        ) from exc


def loop_state(parameters: list[torch.nn.Parameter], optimiser: torch.optim.Optimizer, world: World = SINGLE):
    """A training loop's weights ("parameter.<i>"), optimiser moments ("optimiser.<i>.<key>") and
    random-number state as named tensors; -> (tensors, the optimiser's parameter groups, JSON-able)."""
    state = optimiser.state_dict()
    tensors = {
        **{f"parameter.{index}": parameter for index, parameter in enumerate(parameters)},
        **{
            f"optimiser.{index}.{key}": torch.as_tensor(value)
            for index, moments in state["state"].items()
            for key, value in moments.items()
        },
        **random_state(parameters[0].device, world),
    }
    return tensors, state["param_groups"]


def restore_loop_state(
    tensors: dict[str, torch.Tensor],
    groups: list[dict],
    parameters: list[torch.nn.Parameter],
    optimiser: torch.optim.Optimizer,
    world: World = SINGLE,
) -> None:
    """Put back what `loop_state` took: the weights, the optimiser (its moments move to their
    parameters' device) and the random-number state."""
    if sum(name.startswith("parameter.") for name in tensors) != len(parameters):
        raise CheckpointError(
            "A stage's saved progress holds other weights than the stage trains: delete its "
            ".progress.safetensors file to redo the stage from its start."
        )
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            parameter.copy_(tensors[f"parameter.{index}"])
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimiser."):
            _, index, key = name.split(".", 2)
            moments.setdefault(int(index), {})[key] = value
    optimiser.load_state_dict({"state": moments, "param_groups": groups})
    restore_random_state(tensors, parameters[0].device, world)
