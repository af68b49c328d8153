"""One training loop for the LLM recommenders: the stage decides what trains (schedule.py, section
3.4). Each stage is early-stopped on valid AUC and ends holding its best weights; the starting point
counts as a candidate, so a stage never ends worse on valid than it began.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import get_scheduler

from .config import CCFConfig
from .data.dataset import Split
from .distributed import SINGLE, World, check_global_batch
from .engine import score_rows
from .errors import CCFLLMError
from .loop import (
    EarlyStopping,
    Update,
    optimiser_step,
    progress_bar,
    resume_loop_progress,
    save_loop_progress,
)
from .methods import LOSSES
from .methods.ccf_llm import CCFLLM, Answer
from .metrics import auc
from .partial import load_progress
from .prompt import PromptBatch, PromptBuilder
from .schedule import Stage, learning_rate, trainable_parameters, training_rows, trains_backbone


@dataclass
class StageResult:
    stage: str
    best_valid_auc: float
    best_step: int
    steps: int
    seconds: float
    curve: list[dict] = field(
        default_factory=list
    )  # per validation: step, train loss since the last, valid AUC


def train_stage(
    model: CCFLLM,
    stage: Stage,
    builder: PromptBuilder,
    train: Split,
    valid: Split,
    config: CCFConfig,
    progress: bool = True,
    train_features: torch.nn.Module | None = None,
    progress_file: Path | None = None,
    world: World = SINGLE,
) -> StageResult:
    """Train the parameters of `stage` on sampled train rows; validate every `eval_every` steps.
    With `train_features`, the training rows read their x^CF from it (a backbone that did not see
    them) and validation reads the model's own. With `progress_file`, the loop's state is saved there
    after each validation, and a stage that finds one there goes on from it, ending as it would have
    unbroken. In a data-parallel `world`, each rank trains on its share of every batch (the batch is
    the global one) and scores its share of the valid rows; only rank 0 saves the progress."""
    started = time.perf_counter()
    check_global_batch(config.batch_size, world)
    parameters = trainable_parameters(model, stage, config.tune_cf)
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate(config, stage), weight_decay=0.0)
    scaler = loss_scaler(model, parameters)
    generator = np.random.default_rng(config.seed)
    train_rows = sample_rows(len(train), training_rows(config, stage), generator)
    valid_rows = sample_rows(len(valid), config.valid_rows, np.random.default_rng(config.seed + 1))
    steps_per_epoch = -(-len(train_rows) // config.batch_size)
    eval_every = config.eval_every or steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    schedule = learning_rate_schedule(optimiser, config.lr_schedule, total_steps)

    def validate() -> float:
        scores = score_rows(model, builder, valid, valid_rows, config.eval_batch_size, world=world)
        return auc(valid.label[valid_rows], scores)

    device = next(model.parameters()).device
    batches = [
        rows
        for _ in range(config.epochs)
        for rows in np.array_split(generator.permutation(train_rows), steps_per_epoch)
    ]
    check_shards(batches, world)
    saved = load_progress(progress_file)
    if saved is None:
        best_state = _snapshot(parameters)
        start = validate()  # the starting point is a candidate: a stage never ends worse than it began
        loop = _Loop(step=0, stopping=EarlyStopping(config.patience, best=start, best_at=0), seconds=0.0)
        loop.curve.append({"step": 0, "train_loss": None, "valid_auc": start})
    else:
        loop, best_state = _resumed_loop(
            saved, config.patience, parameters, optimiser, schedule, scaler, world
        )
    stopping, losses = loop.stopping, []
    bar = progress_bar(total_steps, f"stage {stage.value}", initial=loop.step, enabled=progress)
    bar.set_postfix(valid_auc=f"{stopping.best:.4f}")
    for rows in batches[loop.step :] if not stopping.done else []:
        model.train()
        if model.cf is not None:  # a frozen backbone keeps eval mode (no dropout)
            model.cf.train(trains_backbone(config, stage))
        mine = world.shard(rows)
        batch = builder.batch(train.uid[mine], train.iid[mine], train.history[mine], train.label[mine])
        share = len(mine) / len(rows)  # of the global batch's mean loss
        with cf_features_of(model, train_features):
            update = Update(parameters, world, share, scaler)
            losses.append(training_step(model, batch.to(device), optimiser, loss_for(config), update=update))
        schedule.step()
        loop.step += 1
        bar.update()
        if loop.step % eval_every and loop.step != total_steps:
            continue
        valid_auc = validate()
        loop.curve.append({"step": loop.step, "train_loss": float(np.mean(losses)), "valid_auc": valid_auc})
        losses = []
        if stopping.improved(valid_auc, loop.step):
            best_state = _snapshot(parameters)
        bar.set_postfix(
            loss=f"{loop.curve[-1]['train_loss']:.4f}",
            valid_auc=f"{valid_auc:.4f}",
            best=f"{stopping.best:.4f}",
        )
        if progress_file is not None:
            seconds = time.perf_counter() - started
            state = (parameters, best_state, optimiser, schedule, scaler)
            _save_loop(progress_file, loop, seconds, *state, world)
        if stopping.done:
            break
    bar.close()
    _restore(parameters, best_state)
    model.eval()
    seconds = loop.seconds + time.perf_counter() - started
    return StageResult(stage.value, stopping.best, stopping.best_at, loop.step, seconds, loop.curve)


@dataclass
class _Loop:
    """What train_stage's loop carries from step to step, besides the weights and the optimiser."""

    step: int
    stopping: EarlyStopping  # on valid AUC
    seconds: float  # spent in this stage by the processes before this one
    curve: list[dict] = field(default_factory=list)


def _save_loop(
    path: Path, loop: _Loop, seconds: float, parameters, best_state, optimiser, schedule, scaler, world
) -> None:
    """The loop's state after a validation, for a stage that is interrupted to go on from."""
    best = {f"best.{index}": value for index, value in enumerate(best_state)}
    stopping = loop.stopping
    record = {
        "step": loop.step,
        "best_auc": stopping.best,
        "best_step": stopping.best_at,
        "bad_validations": stopping.bad,
        "seconds": loop.seconds + seconds,
        "curve": loop.curve,
        "schedule": schedule.state_dict(),
    }
    if scaler is not None:
        record["loss_scaler"] = scaler.state_dict()
    save_loop_progress(path, parameters, optimiser, record, best, world)


def _resumed_loop(
    saved, patience, parameters, optimiser, schedule, scaler, world
) -> tuple[_Loop, list[torch.Tensor]]:
    """The loop, weights, optimiser, schedule, loss scale and random-number state `_save_loop` kept;
    -> (loop, best weights)."""
    tensors, record = resume_loop_progress(saved, parameters, optimiser, world)
    schedule.load_state_dict(record["schedule"])
    if scaler is not None and "loss_scaler" in record:
        scaler.load_state_dict(record["loss_scaler"])
    best_state = [tensors[f"best.{i}"].to(parameters[i].device) for i in range(len(parameters))]
    stopping = EarlyStopping(patience, record["best_auc"], record["best_step"], record["bad_validations"])
    return _Loop(record["step"], stopping, record["seconds"], record["curve"]), best_state


def check_shards(batches: list[np.ndarray], world: World) -> None:
    """Every rank needs a row of every batch; a batch smaller than the number of processes (a stage
    of very few rows) is refused rather than left to a rank with nothing to train on."""
    smallest = min((len(rows) for rows in batches), default=world.size)
    if smallest < world.size:
        raise CCFLLMError(
            f"A training batch of this stage holds {smallest} rows, fewer than the {world.size} "
            "processes sharing it: train on more rows (train_rows, fusion_rows) or with fewer processes."
        )


WARMUP_SHARE = 0.03  # FastChat's Vicuna training script: --warmup_ratio 0.03 --lr_scheduler_type cosine


def learning_rate_schedule(
    optimiser: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of that name (its `lr_scheduler_type`): 'constant', or 'cosine' as in
    Vicuna's training script, which the paper follows (4.1): a linear warm-up over the first 3% of the
    stage's steps, then a cosine decay to zero at its last step. 'constant' takes no warm-up."""
    warmup_steps = math.ceil(WARMUP_SHARE * total_steps)  # as transformers' Trainer rounds warmup_ratio
    return get_scheduler(schedule, optimiser, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def loss_for(config: CCFConfig) -> Callable[[Answer, torch.Tensor], torch.Tensor]:
    """The method's training loss, (answer, label) -> scalar: Eq. 5 for CCF-LLM (config.loss)."""
    train_loss = LOSSES[config.loss].train
    return lambda answer, label: train_loss(answer, label, config.loss_k)


def training_step(
    model: CCFLLM,
    batch: PromptBatch,
    optimiser: torch.optim.Optimizer,
    loss: Callable[[Answer, torch.Tensor], torch.Tensor],
    log_probs: Callable[[CCFLLM, PromptBatch], Answer] = CCFLLM.forward,
    update: Update | None = None,
) -> float:
    """One update on `loss`; `log_probs` is the forward that gives the answer (engine or naive).
    -> the loss, over the global batch where `update` shares it among ranks."""
    return optimiser_step(loss(log_probs(model, batch), batch.label), optimiser, update)


def loss_scaler(model: CCFLLM, parameters: list[torch.nn.Parameter]) -> torch.amp.GradScaler | None:
    """A GradScaler where the LLM computes in float16, whose small gradients would underflow
    unscaled (bfloat16 has float32's range and needs none); None otherwise. The trained weights
    themselves must be float32 (peft keeps LoRA's so), so the updates are not rounded away."""
    if next(model.llm.parameters()).dtype != torch.float16:
        return None
    if any(p.dtype != torch.float32 for p in parameters):
        raise CCFLLMError(
            "Training a float16 model needs float32 trainable weights for loss scaling; these are "
            f"{sorted({str(p.dtype) for p in parameters})}. Pass --set dtype=bfloat16 or dtype=float32."
        )
    return torch.amp.GradScaler(next(model.llm.parameters()).device.type)


@contextmanager
def cf_features_of(model: CCFLLM, features: torch.nn.Module | None) -> Iterator[None]:
    """Let `model` read x^CF from `features` inside the block (nothing changes for None)."""
    if features is None:
        yield
        return
    own, model.cf = model.cf, features
    try:
        yield
    finally:
        model.cf = own


def sample_rows(n_rows: int, wanted: int, generator: np.random.Generator) -> np.ndarray:
    """`wanted` row indices drawn without replacement (all rows, in order, if wanted is 0 or too many)."""
    if wanted == 0 or wanted >= n_rows:
        return np.arange(n_rows)
    return np.sort(generator.choice(n_rows, size=wanted, replace=False))


def _snapshot(parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _restore(parameters: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, saved in zip(parameters, state, strict=True):
            parameter.copy_(saved)
