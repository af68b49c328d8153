"""The core every training loop shares (train.train_stage, next_item_train.train_alignment and
train_stage2, cf.train.train_cf, cf.next_item.train_next_item_sasrec): the update a step makes, the
progress bar, early stopping on a validation figure, and the loop's state saved for resuming.

Each loop keeps its own order of batches and its own random draws, so that it trains, to the digit,
what it trained before these pieces were shared; it configures these pieces instead of re-coding them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import CFConfig
from .distributed import SINGLE, World
from .partial import loop_state, restore_loop_state, save_progress


@dataclass
class Update:
    """How a step turns its loss into an update beyond `optimiser.step()`: in a data-parallel run,
    its rank's `share` of the global batch and the gradients summed over the ranks; on a float16
    model, loss scaling (`scaler`)."""

    parameters: list[torch.nn.Parameter]
    world: World = SINGLE
    share: float = 1.0
    scaler: torch.amp.GradScaler | None = None


def optimiser_step(
    loss: torch.Tensor, optimiser: torch.optim.Optimizer, update: Update | None = None
) -> float:
    """One update of the optimiser's parameters on `loss`; -> the loss, over the global batch where
    `update` shares it among ranks."""
    optimiser.zero_grad(set_to_none=True)
    if update is None or (update.world.size == 1 and update.scaler is None):
        loss.backward()
        optimiser.step()
        return loss.item()
    # A rank's mean loss weighs by its share of the batch: the ranks' gradients then sum to those
    # of the mean over the global batch, however unevenly the batch divides.
    weighted = loss * update.share
    scaled = update.scaler.scale(weighted) if update.scaler is not None else weighted
    scaled.backward()
    total = weighted.item()
    if update.world.size > 1:  # summed before unscaling: every rank sees the same inf/NaN, skips alike
        total = update.world.sum_gradients(update.parameters, weighted)
    if update.scaler is None:
        optimiser.step()
    else:
        update.scaler.step(optimiser)  # unscales; skips the step where a gradient overflowed
        update.scaler.update()
    return total


def progress_bar(total: int, label: str, unit: str = "step", initial: int = 0, enabled: bool = True) -> tqdm:
    """The loop's bar: `label` before it, counted in `unit`s, starting at `initial` (a resumed loop)."""
    return tqdm(total=total, initial=initial, desc=label, unit=unit, disable=not enabled)


@dataclass
class EarlyStopping:
    """Validation by validation: the best figure so far, where it was reached, and how many
    validations since have not beaten it; the loop stops after `patience` of them."""

    patience: int
    best: float = -1.0  # below any AUC or NDCG: the first validation is the best so far
    best_at: int = -1
    bad: int = 0

    def improved(self, value: float, at: int) -> bool:
        """Record the figure `value` of validation `at`; True where it is the best so far."""
        if value > self.best:
            self.best, self.best_at, self.bad = value, at, 0
            return True
        self.bad += 1
        return False

    @property
    def done(self) -> bool:
        return self.bad >= self.patience


def train_epochs(
    model: torch.nn.Module,
    config: CFConfig,
    train_epoch: Callable[[], list[float]],
    validate: Callable[[], float],
    figure: str,
    label: str,
    progress: bool = True,
) -> tuple[EarlyStopping, list[dict]]:
    """The epoch loop of the CF backbones: an epoch of `train_epoch` (-> its batches' losses), then
    `validate` (-> the figure named `figure`, higher is better); the best epoch's weights are kept and
    the loop stops after `config.patience` epochs without a better one, or after `config.max_epochs`.
    The model ends with those weights, in eval mode. -> the stopping record (best figure, best epoch)
    and one row per epoch."""
    stopping, best_state, epochs = EarlyStopping(config.patience), None, []
    bar = progress_bar(config.max_epochs, label, unit="epoch", enabled=progress)
    for epoch in range(config.max_epochs):
        model.train()
        losses = train_epoch()
        value = validate()
        epochs.append({"epoch": epoch, "train_loss": float(np.mean(losses)), figure: value})
        if stopping.improved(value, epoch):
            best_state = copy.deepcopy(model.state_dict())
        bar.update()
        bar.set_postfix(
            {"loss": f"{np.mean(losses):.4f}", figure: f"{value:.4f}", "best": f"{stopping.best:.4f}"}
        )
        if stopping.done:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return stopping, epochs


def save_loop_progress(
    path: Path,
    parameters: list[torch.nn.Parameter],
    optimiser: torch.optim.Optimizer,
    record: dict,
    tensors: dict[str, torch.Tensor] | None = None,
    world: World = SINGLE,
) -> None:
    """The loop's state for a run that is interrupted to go on from: the trained weights, the
    optimiser and the random-number state, with the loop's own `tensors` and JSON-able `record`.
    Every rank gives its random-number state (a collective); rank 0 writes."""
    state, groups = loop_state(parameters, optimiser, world)
    if world.is_main:
        save_progress(path, {**state, **(tensors or {})}, {**record, "optimiser": groups})


def resume_loop_progress(
    saved: tuple[dict[str, torch.Tensor], dict],
    parameters: list[torch.nn.Parameter],
    optimiser: torch.optim.Optimizer,
    world: World = SINGLE,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Put back the weights, optimiser and random-number state that `save_loop_progress` kept;
    -> (the loop's tensors, its record)."""
    tensors, record = saved
    record = dict(record)
    restore_loop_state(tensors, record.pop("optimiser"), parameters, optimiser, world)
    return tensors, record
