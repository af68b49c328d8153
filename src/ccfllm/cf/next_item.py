"""SASRec trained for the next item, the collaborative model A-LLMRec starts from (its stage 1 reads
SASRec's item table E_i and its user representation).

As Kang & McAuley train it: at every position of a user's training sequence, BCE of the true next item
against one item the user never liked, drawn anew each epoch. The score is the dot product of the
sequence representation and the item's embedding (no biases). Early stopping on valid NDCG@10 over the
task's candidate sets, keeping the best weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CFConfig
from ..data.dataset import pad_histories
from ..data.next_item import NextItemSplit, NextItemTask
from ..device import resolve_device, seed_everything
from ..errors import CCFLLMError
from ..loop import optimiser_step, train_epochs
from ..metrics import hit_at_k, ndcg_at_k, target_ranks
from .sasrec import SASRec


@dataclass
class NextItemTrainResult:
    model: SASRec
    best_epoch: int
    valid_ndcg10: float
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_next_item_sasrec(
    config: CFConfig, task: NextItemTask, progress: bool = True
) -> NextItemTrainResult:
    if config.model != "sasrec":
        raise CCFLLMError(f"The next-item task trains SASRec, not {config.model!r}.")
    started = time.perf_counter()
    device = resolve_device(config.device)
    order = seed_everything(config.seed)
    n_users = int(max(task.sequences)) + 1
    model = SASRec(config, n_users, task.n_items).to(device)
    history, positive, users = _prefixes(task, config.max_history)
    history, positive = torch.as_tensor(history, device=device), torch.as_tensor(positive, device=device)
    liked = [set(task.sequences[u].tolist()) for u in users]
    sampler = np.random.default_rng(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    def train_epoch() -> list[float]:
        negative = torch.as_tensor(_negatives(liked, task.n_items, sampler), device=device)
        losses = []
        for batch in torch.randperm(len(positive), generator=order).to(device).split(config.batch_size):
            user = model.user_embedding(users_placeholder(batch), history[batch])  # (B, l)
            pos = (user * model.item_embedding(positive[batch])).sum(-1)
            neg = (user * model.item_embedding(negative[batch])).sum(-1)
            loss = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            loss = loss + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
            loss = loss + config.weight_decay * model.item_table(positive[batch]).pow(2).sum(-1).mean()
            losses.append(optimiser_step(loss, optimiser))
        return losses

    def validate() -> float:
        return ndcg_at_k(rank_candidates(model, task.splits["valid"]), 10)

    stopping, epochs = train_epochs(
        model, config, train_epoch, validate, "valid_ndcg10", "train sasrec (next item)", progress
    )
    return NextItemTrainResult(model, stopping.best_at, stopping.best, epochs, time.perf_counter() - started)


@torch.no_grad()
def rank_candidates(model: SASRec, split: NextItemSplit, batch_size: int = 512) -> np.ndarray:
    """The answer's 0-based rank among each row's candidates by the model's score. -> (N,)"""
    model.eval()
    device = next(model.parameters()).device
    width = model.config.max_history
    scores = []
    for start in range(0, len(split), batch_size):
        rows = slice(start, start + batch_size)
        history = torch.as_tensor(_fit(split.history[rows], width), device=device)
        user = model.user_embedding(users_placeholder(history), history)  # (B, l)
        items = model.item_embedding(torch.as_tensor(split.candidates[rows], device=device))  # (B, C, l)
        scores.append(torch.einsum("bl,bcl->bc", user, items).cpu().numpy())
    return target_ranks(np.concatenate(scores), split.answer)


def next_item_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Hit@1, Hit@5, Hit@10, NDCG@5, NDCG@10 of the answers' ranks."""
    return {
        **{f"hit@{k}": hit_at_k(ranks, k) for k in (1, 5, 10)},
        **{f"ndcg@{k}": ndcg_at_k(ranks, k) for k in (5, 10)},
    }


def users_placeholder(rows: torch.Tensor) -> torch.Tensor:
    """SASRec's user vector comes from the history alone; its uid argument is unused."""
    return torch.zeros(len(rows), dtype=torch.long, device=rows.device)


def _prefixes(task: NextItemTask, width: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Every (history before position t, item at t) of every training sequence, t >= 1."""
    histories, positives, users = [], [], []
    for uid, sequence in task.sequences.items():
        for t in range(1, len(sequence)):
            histories.append(sequence[:t].tolist())
            positives.append(int(sequence[t]))
            users.append(uid)
    return pad_histories(histories, width), np.asarray(positives, dtype=np.int64), users


def _negatives(liked: list[set[int]], n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One item per example that its user never liked (ids 1..n_items-1)."""
    draws = rng.integers(1, n_items, size=len(liked))
    for row, item in enumerate(draws):
        while item in liked[row]:
            item = rng.integers(1, n_items)
        draws[row] = item
    return draws


def _fit(history: np.ndarray, width: int) -> np.ndarray:
    """Histories cut or left-padded to the model's width."""
    if history.shape[1] >= width:
        return history[:, -width:]
    return np.pad(history, ((0, 0), (width - history.shape[1], 0)))
