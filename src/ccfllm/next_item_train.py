"""A-LLMRec's two training loops: stage 1 aligns SASRec's item embeddings with the sentence encoder's
(methods/allmrec.py's losses), stage 2 trains the projections that feed them to the frozen LLM as soft
prompts, on the language-model loss of the next item's title (resumable from its saved progress).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cf.sasrec import SASRec
from .data.next_item import (
    NextItemTask,
    draw_candidates,
    titled_items,
    training_positions,
    unliked_item,
)
from .device import seed_everything
from .loop import optimiser_step, progress_bar, resume_loop_progress, save_loop_progress
from .methods import allmrec
from .methods.allmrec import (
    ALLMRec,
    CollaborativeTextAlignment,
    item_text_embeddings,
    titled_ids,
)
from .next_item_prompt import NextItemPrompts
from .partial import load_progress
from .text_encoder import SentenceEncoder


@dataclass
class AlignmentResult:
    alignment: CollaborativeTextAlignment
    losses: list[dict]  # per epoch: the mean of each loss


def train_alignment(
    task: NextItemTask,
    sasrec: SASRec,
    encoder: SentenceEncoder,
    *,
    latent_dim: int = 128,
    hidden: int = 256,
    latent_norm: bool = False,
    scale_inputs: bool = False,
    alpha: float = 0.5,
    beta: float = 0.5,
    lr: float = 1e-4,
    batch_size: int = 32,
    epochs: int = 1,
    freeze_text: bool = False,
    matching: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> AlignmentResult:
    """Stage 1 over the task's training rows (a user's history and next item, and a sampled item the user
    never liked). SASRec stays frozen; SBERT is fine-tuned with the alignment unless `freeze_text`.
    `scale_inputs`: E_i and Q_i in units of their spread over the catalogue (set_scales)."""
    generator = seed_everything(seed)
    sasrec.eval().requires_grad_(False)
    encoder.requires_grad_(not freeze_text)
    device = next(sasrec.parameters()).device
    alignment = CollaborativeTextAlignment(sasrec.config.dim, encoder.dim, latent_dim, hidden, latent_norm)
    alignment = alignment.to(device)
    if scale_inputs:
        encoder.eval()
        texts = item_text_embeddings(encoder, task)
        titled = titled_ids(texts)
        alignment.set_scales(sasrec.item_embedding(titled), texts[titled])
    parameters = list(alignment.parameters()) + ([] if freeze_text else list(encoder.parameters()))
    optimiser = torch.optim.Adam(parameters, lr=lr)
    train = task.splits["train"]
    liked = {uid: set(sequence.tolist()) for uid, sequence in task.sequences.items()}
    sampler = np.random.default_rng(seed)
    titles = task.item_titles
    history_width = sasrec.config.max_history
    epochs_log = []
    bar = progress_bar(epochs, "A-LLMRec stage 1", unit="epoch", enabled=progress)
    for _ in range(epochs):
        encoder.train(not freeze_text)
        totals: dict[str, list[float]] = {}
        for batch in torch.randperm(len(train), generator=generator).split(batch_size):
            rows = batch.numpy()
            positive = torch.as_tensor(train.target[rows], device=device)
            negative = torch.as_tensor(
                [unliked_item(liked[int(u)], task.n_items, sampler) for u in train.uid[rows]], device=device
            )
            history = torch.as_tensor(train.history[rows][:, -history_width:], device=device)
            with torch.no_grad():
                user = sasrec.user_embedding(torch.zeros_like(positive), history)
                positive_cf, negative_cf = sasrec.item_embedding(positive), sasrec.item_embedding(negative)
            items = torch.cat([positive, negative])
            text = encoder([titles[int(i)] for i in items])
            losses = alignment.losses(
                torch.cat([positive_cf, negative_cf]), text, user, positive_cf, negative_cf
            )
            optimiser_step(losses.total(alpha, beta, matching), optimiser)
            for name, value in vars(losses).items():
                totals.setdefault(name, []).append(value.item())
        epochs_log.append({name: float(np.mean(values)) for name, values in totals.items()})
        bar.update()
    bar.close()
    alignment.eval()
    encoder.eval()
    return AlignmentResult(alignment, epochs_log)


# -- stage 2: soft prompts into a frozen LLM -------------------------------------------------------------


def train_stage2(
    model: ALLMRec,
    prompts: NextItemPrompts,
    task: NextItemTask,
    *,
    lr: float = 1e-4,
    batch_size: int = 4,
    epochs: int = 1,
    n_candidates: int = 20,
    seed: int = 0,
    rows: int = 0,
    positions: int = 1,
    parameters: list[nn.Parameter] | None = None,
    compile: bool = False,
    progress: bool = True,
    progress_file: Path | None = None,
    checkpoint_seconds: float = 300.0,
    label: str = "A-LLMRec stage 2",
) -> Stage2Result:
    """Train F_U and F_I (or the given `parameters`: the LoRA weights of the TALLRec baseline) on the
    task's training rows at the last `positions` of each user's sequence (training_positions), each with
    candidates drawn afresh (its next item and items its user never liked); -> every step's loss and
    the seconds it took.
    `compile`: the LLM's layers run compiled (about 15-40 s once per process). With `progress_file`,
    the loop's state is saved there every `checkpoint_seconds` and after the last step, and a call that
    finds one there goes on from it, ending as it would have unbroken. `label` names the loop on
    its progress bar."""
    started = time.perf_counter()
    generator = seed_everything(seed)
    rng = np.random.default_rng(seed)
    if parameters is None:
        parameters = [*model.user_projection.parameters(), *model.item_projection.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=lr)
    train = training_positions(task, positions)
    chosen = np.arange(len(train))  # `rows` > 0: a seeded sample of the training rows
    if 0 < rows < len(train):
        chosen = np.sort(rng.choice(len(train), rows, replace=False))
    titled = titled_items(task.item_titles)
    steps_per_epoch = -(-len(chosen) // batch_size)
    losses, order, seconds_before = [], None, 0.0
    saved = load_progress(progress_file)
    if saved is not None:
        losses, order, seconds_before = _resume_stage2(saved, parameters, optimiser, generator, rng)
    bar = progress_bar(steps_per_epoch * epochs, label, initial=len(losses), enabled=progress)
    saved_at = time.perf_counter()
    for epoch in range(len(losses) // steps_per_epoch, epochs):
        if order is None or epoch * steps_per_epoch == len(losses):
            order = torch.as_tensor(chosen)[torch.randperm(len(chosen), generator=generator)]
        for batch in order.split(batch_size)[len(losses) - epoch * steps_per_epoch :]:
            rows = batch.numpy()
            candidates = draw_candidates(task, titled, train.uid[rows], train.target[rows], n_candidates, rng)
            model.train()
            history, target = train.history[rows], train.target[rows]
            loss = allmrec.next_title_loss(model, prompts, history, candidates, target, compile)
            losses.append(optimiser_step(loss, optimiser))
            bar.update()
            last = len(losses) == steps_per_epoch * epochs
            if progress_file is not None and (last or time.perf_counter() - saved_at >= checkpoint_seconds):
                seconds = seconds_before + time.perf_counter() - started
                _save_stage2(progress_file, parameters, optimiser, losses, seconds, order, generator, rng)
                saved_at = time.perf_counter()
    bar.close()
    model.eval()
    return Stage2Result(losses, seconds_before + time.perf_counter() - started)


@dataclass
class Stage2Result:
    losses: list[float]  # every step's, across the processes an interrupted stage ran in
    seconds: float  # the stage's time, over those processes (to their last saved step)


def _save_stage2(path, parameters, optimiser, losses, seconds, order, generator, rng) -> None:
    """Stage 2's state after a step: weights, optimiser, losses, this epoch's order, random numbers."""
    tensors = {"order": order, "generator": generator.get_state()}
    record = {"losses": losses, "seconds": seconds, "numpy_rng": rng.bit_generator.state}
    save_loop_progress(path, parameters, optimiser, record, tensors)


def _resume_stage2(saved, parameters, optimiser, generator, rng) -> tuple[list[float], torch.Tensor, float]:
    """Load what `_save_stage2` kept into the loop's objects; -> (losses so far, this epoch's order,
    seconds so far)."""
    tensors, record = resume_loop_progress(saved, parameters, optimiser)
    generator.set_state(tensors["generator"])
    rng.bit_generator.state = record["numpy_rng"]
    return record["losses"], tensors["order"], record["seconds"]
