"""A trained CF backbone on disk: safetensors weights with their config, exported embedding tables, metrics.

A run folder holds
  model.safetensors       the state dict; its metadata names the format, backbone, config and dataset
  embeddings.safetensors  `user` (n_users, l) and `item` (n_items, l) tables for the LLM models, their
                          `user_bias` / `item_bias` / `global_bias` (the score is user·item + the three),
                          `user_in_train` / `item_in_train` masks; rows of ids absent from train are zero
  metrics.json            valid/test AUC and UAUC, best epoch, per-epoch curve, wall time
The folder is written beside its final place and renamed into it, so a failed save leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from ..config import CFConfig, replace_checked, to_dict
from ..data.dataset import CTRDataset, refuse_other_dataset
from ..device import resolve_device
from ..errors import CheckpointError
from ..io import atomic_path, read_safetensors, unreadable_weights
from . import cf_model_class
from .base import CFModel

FORMAT = "ccfllm-cf/1"
MODEL_FILE, EMBEDDINGS_FILE, METRICS_FILE = "model.safetensors", "embeddings.safetensors", "metrics.json"


def save_cf(
    model: CFModel, dataset: CTRDataset, folder: str | Path, metrics: dict, overwrite: bool = False
) -> Path:
    """Write a run folder for `model` trained on `dataset` (atomically)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another --out or pass --overwrite.")
    metadata = {
        "format": FORMAT,
        "model": model.name,
        "config": json.dumps(to_dict(model.config), sort_keys=True),
        "dataset": json.dumps(dataset.fingerprint(), sort_keys=True),
    }
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(state, tmp / MODEL_FILE, metadata=metadata)
        save_file(export_embeddings(model, dataset), tmp / EMBEDDINGS_FILE, metadata=metadata)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return folder


@torch.no_grad()
def export_embeddings(model: CFModel, dataset: CTRDataset) -> dict[str, torch.Tensor]:
    """The user and item tables x^CF for every id. SASRec has no user table: a user's row is the
    encoding of the liked history of their latest train row."""
    model.eval()
    device = next(model.parameters()).device
    train = dataset.train
    user_in_train = torch.zeros(dataset.n_users, dtype=torch.bool)
    user_in_train[np.unique(train.uid)] = True
    item_in_train = torch.zeros(dataset.n_items, dtype=torch.bool)
    item_in_train[np.unique(train.iid)] = True

    latest_row = _latest_row_per_user(train.uid, train.timestamp)  # {uid: row index}
    uid = torch.tensor(list(latest_row.keys()), device=device)
    history = torch.tensor(
        train.history[list(latest_row.values())][:, -model.config.max_history :], device=device
    )
    users = torch.zeros(dataset.n_users, model.config.dim)
    users[uid.cpu()] = model.user_embedding(uid, history).float().cpu()
    items = model.item_embedding(torch.arange(dataset.n_items, device=device)).float().cpu()
    items[~item_in_train] = 0.0
    return {
        "user": users,
        "item": items.contiguous(),
        "user_bias": model.user_bias.weight.detach().float().cpu().squeeze(-1) * user_in_train,
        "item_bias": model.item_bias.weight.detach().float().cpu().squeeze(-1) * item_in_train,
        "global_bias": model.global_bias.detach().float().cpu().reshape(1),
        "user_in_train": user_in_train,
        "item_in_train": item_in_train,
    }


def load_cf(
    folder: str | Path,
    dataset: CTRDataset | None = None,
    expect_model: str | None = None,
    expect_dim: int | None = None,
    device: str = "auto",
) -> CFModel:
    """Rebuild a saved backbone in eval mode; refuse one from another backbone, dimension or dataset."""
    path = Path(folder) / MODEL_FILE
    metadata = read_metadata(folder)
    config = replace_checked(CFConfig(), {**json.loads(metadata["config"]), "device": device})
    if expect_model is not None and config.model != expect_model:
        raise CheckpointError(
            f"{folder} holds a {config.model} backbone, not the {expect_model} that was asked for."
        )
    if expect_dim is not None and config.dim != expect_dim:
        raise CheckpointError(f"{folder} has dimension {config.dim}, but {expect_dim} was asked for.")
    trained_on = json.loads(metadata["dataset"])
    if dataset is not None:
        refuse_other_dataset(folder, trained_on, dataset)
    state = _read_state(path)
    model = cf_model_class(config.model)(config, trained_on["n_users"], trained_on["n_items"])
    model.adopt_shapes(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit a {config.model} of dimension {config.dim}: {exc}"
        ) from exc
    return model.to(resolve_device(device)).eval()


def load_embeddings(folder: str | Path) -> dict[str, torch.Tensor]:
    read_metadata(folder)
    return _read_state(Path(folder) / EMBEDDINGS_FILE)


def read_metadata(folder: str | Path) -> dict[str, str]:
    """The metadata of a run folder's model file, checked for format."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"No CF checkpoint at {folder}: {MODEL_FILE} is missing. Train one with `ccfllm cf train`."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable_weights(path, exc) from exc
    if metadata.get("format") != FORMAT or not {"model", "config", "dataset"} <= metadata.keys():
        raise CheckpointError(
            f"{path} is not a ccfllm CF checkpoint (format {metadata.get('format')!r}, expected {FORMAT})."
        )
    return metadata


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)


def _latest_row_per_user(uid: np.ndarray, timestamp: np.ndarray) -> dict[int, int]:
    order = np.lexsort((np.arange(len(uid)), timestamp, uid))  # by user, then time, then file order
    sorted_uid = uid[order]
    last = np.r_[sorted_uid[1:] != sorted_uid[:-1], True]
    return dict(zip(sorted_uid[last].tolist(), order[last].tolist(), strict=True))
