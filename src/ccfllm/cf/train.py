"""Train a CF backbone as a CTR model: BCE on the labels, early stopping on valid AUC, best kept."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CFConfig
from ..data.dataset import CTRDataset, Split
from ..device import resolve_device, seed_everything
from ..loop import optimiser_step, train_epochs
from ..metrics import auc, split_metrics
from . import cf_model_class
from .base import CFModel


@dataclass
class SplitTensors:
    """A split's columns on the training device."""

    uid: torch.Tensor
    iid: torch.Tensor
    label: torch.Tensor
    history: torch.Tensor

    @classmethod
    def of(cls, split: Split, max_history: int, device: torch.device) -> SplitTensors:
        history = split.history[:, -max_history:] if max_history else split.history[:, :0]
        return cls(
            uid=torch.tensor(split.uid).to(device),
            iid=torch.tensor(split.iid).to(device),
            label=torch.tensor(split.label).float().to(device),
            history=torch.tensor(history).to(device),
        )

    def __len__(self) -> int:
        return len(self.uid)


@dataclass
class CFTrainResult:
    model: CFModel
    best_epoch: int
    valid_auc: float
    epochs: list[dict] = field(default_factory=list)  # per epoch: train loss, valid AUC
    seconds: float = 0.0


def train_cf(config: CFConfig, dataset: CTRDataset, progress: bool = True) -> CFTrainResult:
    """Train `config.model` on dataset.train; stop when valid AUC has not improved for `patience` epochs."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    order_generator = seed_everything(config.seed)
    model = cf_model_class(config.model).build(config, dataset).to(device)
    train = SplitTensors.of(dataset.train, config.max_history, device)
    valid = SplitTensors.of(dataset.valid, config.max_history, device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    def train_epoch() -> list[float]:
        losses = []
        for batch in (
            torch.randperm(len(train), generator=order_generator).to(device).split(config.batch_size)
        ):
            uid, iid, history, label = (
                train.uid[batch],
                train.iid[batch],
                train.history[batch],
                train.label[batch],
            )
            users, items = model.encode(uid, iid, history)
            logits = model.score(users, items, uid, iid)
            loss = F.binary_cross_entropy_with_logits(logits, label)
            embedding_l2, bias_l2 = model.l2(users, items, uid, iid)
            loss = loss + config.weight_decay * embedding_l2 + config.bias_decay * bias_l2
            losses.append(optimiser_step(loss, optimiser))
        return losses

    def validate() -> float:
        return auc(dataset.valid.label, predict_tensors(model, valid, config.batch_size * 4))

    stopping, epochs = train_epochs(
        model, config, train_epoch, validate, "valid_auc", f"train {config.model}", progress
    )
    return CFTrainResult(model, stopping.best_at, stopping.best, epochs, time.perf_counter() - started)


@torch.no_grad()
def predict_tensors(model: CFModel, rows: SplitTensors, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for every row. -> (N,) float64"""
    model.eval()
    scores = [
        torch.sigmoid(model(rows.uid[s], rows.iid[s], rows.history[s])).double().cpu()
        for s in _batches(len(rows), batch_size)
    ]
    return torch.cat(scores).numpy()


def predict_split(model: CFModel, split: Split, batch_size: int = 4096) -> np.ndarray:
    device = next(model.parameters()).device
    return predict_tensors(model, SplitTensors.of(split, model.config.max_history, device), batch_size)


def evaluate_cf(model: CFModel, dataset: CTRDataset, splits: tuple[str, ...] = ("valid", "test")) -> dict:
    """{split: {"auc": ..., "uauc": ...}} for the named splits."""
    results = {}
    for name in splits:
        split = dataset.splits[name]
        results[name] = split_metrics(split.uid, split.label, predict_split(model, split))
    return results


def _batches(n_rows: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size)]
