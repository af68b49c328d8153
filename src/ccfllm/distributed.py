"""Data-parallel runs: one process per device, started by Accelerate's launcher or torchrun.

`accelerate launch --num_processes N -m ccfllm train ...` (or `torchrun --nproc-per-node N -m ccfllm
train ...`) starts N copies of the command with RANK and WORLD_SIZE set; `current_world` then joins them
in one process group through Accelerate's `PartialState` (NCCL on CUDA, gloo on a CPU). A command run
without a launcher gets `SINGLE`: no process group, no Accelerate import, and every method below is
a no-op or the identity, so a single process runs the same code as before.

The ranks stay in lock-step without a `DistributedDataParallel` wrapper: each one takes a contiguous
share of every global batch, its loss weighed by that share, and one all-reduce per step sums the
trainable gradients (LoRA and ALG + GATE are a few hundred thousand numbers), so every rank applies
the same update and holds the same weights. Scoring shares out the engine's batches (each the one a
single process would run) and sums the scores back, so every rank computes the metrics, and the
early-stopping decisions, of one process. Only rank 0 writes.

A rank that fails ends the others: a collective whose peer has gone raises at once on gloo and NCCL
("Connection closed by peer"), and the launcher stops the remaining processes and names the failed
rank first.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from .device import resolve_device
from .errors import CCFLLMError, CheckpointError


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's rank among `size`, and its rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    communication_device: str = "cpu"  # where collectives' tensors live: NCCL needs CUDA tensors

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder, its partial parts and the results."""
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device of this rank for the configured `name`: each rank its own GPU (cuda:LOCAL_RANK)."""
        if self.size == 1 or resolve_device(name).type != "cuda":
            return name
        return f"cuda:{self.local_rank}"

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a batch's `rows` (np.array_split: the first ranks take one
        more)."""
        return rows if self.size == 1 else np.array_split(rows, self.size)[self.rank]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's float64 `values` (each rank fills its own rows, the
        others hold zeros), on every rank."""
        if self.size == 1:
            return values
        total = torch.as_tensor(values, dtype=torch.float64).to(self.communication_device)
        torch.distributed.all_reduce(total)
        return total.cpu().numpy()

    def sum_gradients(self, parameters: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Sum the gradients of `parameters` and the scalar `loss` over the ranks, in one all-reduce
        per dtype of one flat buffer (the loss rides at the end of the float32 one); -> the summed
        loss. A parameter without a gradient counts zero."""
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {torch.float32: []}
        for parameter in parameters:
            by_dtype.setdefault(parameter.dtype, []).append(parameter)
        summed_loss = 0.0
        for dtype, group in by_dtype.items():
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            if dtype == torch.float32:
                grads.append(loss.detach().reshape(1).float())
            flat = torch.cat([g.to(self.communication_device) for g in grads])
            torch.distributed.all_reduce(flat)
            sizes = [p.numel() for p in group] + [flat.numel() - sum(p.numel() for p in group)]
            for parameter, total in zip(group, flat.split(sizes), strict=False):  # the last: the loss
                parameter.grad = total.view_as(parameter).to(parameter.device)
            if dtype == torch.float32:
                summed_loss = float(flat[-1].item())
        return summed_loss

    def gather_named(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each rank's `tensors` (all of one shape across the ranks, such as random-number states):
        rank 0's under their own names, rank r's as NAME.rankR, for rank 0 to save."""
        if self.size == 1:
            return tensors
        gathered = {}
        for name, value in tensors.items():
            parts = [torch.empty_like(value, device=self.communication_device) for _ in range(self.size)]
            torch.distributed.all_gather(parts, value.to(self.communication_device))
            gathered[name] = parts[0].to(value.device)
            gathered.update({f"{name}.rank{r}": parts[r].to(value.device) for r in range(1, self.size)})
        return gathered

    def own_named(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """This rank's `names` out of what `gather_named` gave; refused where another number of
        processes saved them (their random-number streams would not continue)."""
        saved_size = 1 + sum(name.startswith(f"{names[0]}.rank") for name in tensors)
        if saved_size != self.size:
            raise CheckpointError(
                f"The interrupted run was saved by {saved_size} process(es) and is resumed by {self.size}: "
                f"resume it with --num_processes {saved_size}, or pass --overwrite to start over."
            )
        suffix = f".rank{self.rank}" if self.rank else ""
        return {name: tensors[name + suffix] for name in names if name + suffix in tensors}


SINGLE = World()


def launched_size() -> int:
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@functools.cache
def current_world(device: str = "auto") -> World:
    """This process's place among the launched ones, joined into one process group the first time;
    SINGLE without a launcher (Accelerate is then not even imported)."""
    if launched_size() == 1:
        return SINGLE
    from accelerate import PartialState

    on_cpu = resolve_device(device).type == "cpu"
    state = PartialState(cpu=on_cpu)  # gloo on a CPU, NCCL on CUDA; reads RANK, WORLD_SIZE, MASTER_*
    communication = "cpu" if state.backend == "gloo" else str(state.device)
    return World(state.process_index, state.num_processes, state.local_process_index, communication)


def check_global_batch(batch_size: int, world: World) -> None:
    """`batch_size` is the global batch: each of the `world.size` processes takes batch_size / size
    rows of it, so that the updates, the learning-rate schedule and the results do not depend on
    how many processes share the work."""
    if batch_size % world.size:
        nearest = max(world.size, batch_size - batch_size % world.size)
        raise CCFLLMError(
            f"batch_size={batch_size} is the global batch, shared by {world.size} processes, and must "
            f"divide by {world.size}: pass --set batch_size={nearest} (or another multiple)."
        )
