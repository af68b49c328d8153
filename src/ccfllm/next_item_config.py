"""A-LLMRec's typed config and its presets (the next-item task, methods/allmrec.py), on config.py's
override machinery: an unknown or mistyped key is an error, never ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import _help, replace_checked
from .errors import CCFLLMError

ALLMREC_VARIANTS = ("a-llmrec", "mlp-llm")  # MLP-LLM: A-LLMRec without the matching loss


@dataclass
class AllmrecConfig:
    """How A-LLMRec is built, trained and evaluated on the next-item task (methods/allmrec.py)."""

    variant: str = _help("'a-llmrec', or 'mlp-llm' (stage 1 without the matching loss)", "a-llmrec")
    llm: str = _help(
        "frozen causal LM: 'smollm2-135m' (embedded), a local folder, or a hub id", "smollm2-135m"
    )
    allow_download: bool = _help("allow `llm` to be fetched from the Hugging Face hub", False)
    encoder: str = _help(
        "sentence encoder: 'all-minilm-l6-v2' (embedded) or a model folder", "all-minilm-l6-v2"
    )
    freeze_text: bool = _help("keep the sentence encoder frozen in stage 1 (the paper tunes it)", False)
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'", "auto")
    dtype: str = _help("the LLM's dtype: 'auto' (bf16 where native), 'bfloat16' or 'float32'", "auto")
    n_candidates: int = _help("candidates per ranked row: the next item and items the user never rated", 20)
    sasrec_dim: int = _help("SASRec's embedding dimension", 64)
    sasrec_history: int = _help("SASRec's longest history", 50)
    sasrec_epochs: int = _help("most epochs of SASRec's next-item training (early-stopped)", 200)
    latent_dim: int = _help("the joint collaborative-text space", 128)
    scale_inputs: bool = _help(
        "stage 1 reads E_i and Q_i in units of their spread over the catalogue (tried; paper: off)", False
    )
    latent_norm: bool = _help(
        "layer-normalise the encoders' outputs so that matching cannot shrink them (tried; paper: off)",
        False,
    )
    hidden: int = _help("hidden width of the encoders, decoders and projections", 256)
    alpha: float = _help("weight of the item reconstruction loss", 0.5)
    beta: float = _help("weight of the text reconstruction loss", 0.5)
    stage1_lr: float = _help("stage 1 learning rate", 1e-4)
    stage1_epochs: int = _help("stage 1 epochs over the training rows", 10)
    stage1_batch: int = _help("stage 1 rows per step", 32)
    stage2_lr: float = _help("stage 2 learning rate", 1e-4)
    stage2_epochs: int = _help("stage 2 epochs over the training rows", 1)
    stage2_batch: int = _help("stage 2 rows per step", 4)
    stage2_rows: int = _help(
        "training rows stage 2 (and the TALLRec baseline) learn from, seeded; 0 = all", 0
    )
    stage2_positions: int = _help(
        "last positions of each user's training sequence stage 2 (and TALLRec) learn from; "
        "1 = A-LLMRec's one row per user, 0 = every position",
        1,
    )
    prompt_history: int = _help("most recent liked items the prompt shows", 10)
    compile_training: bool = _help(
        "compile the LLM's layers (torch.compile) for stage 2 and the TALLRec baseline; 15-40 s once",
        False,
    )
    rank_batch: int = _help("rows ranked per forward pass (on a CPU, 1 wastes nothing on padding)", 1)
    test_rows: int = _help("test rows ranked (a seeded sample); 0 = all", 0)
    cold_user_share: float = _help("share of users held out of training as cold users (3 interactions)", 0.1)
    seed: int = _help("seed for sampling, initialisation and data order", 0)

    def __post_init__(self) -> None:
        if self.variant not in ALLMREC_VARIANTS:
            raise CCFLLMError(
                f"AllmrecConfig.variant must be one of {list(ALLMREC_VARIANTS)}, got {self.variant!r}."
            )
        for name in (
            "n_candidates",
            "sasrec_dim",
            "latent_dim",
            "hidden",
            "stage1_batch",
            "stage2_batch",
            "rank_batch",
        ):
            if getattr(self, name) <= 0:
                raise CCFLLMError(f"AllmrecConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.n_candidates < 2:
            raise CCFLLMError("AllmrecConfig.n_candidates must be at least 2 (the answer and one other).")
        if self.stage2_positions < 0:
            raise CCFLLMError(
                f"AllmrecConfig.stage2_positions must be 0 (every position) or positive, got "
                f"{self.stage2_positions}."
            )


# `cpu`: sized for the 2-core machine and the embedded 135M LLM, about 75 minutes (measured before stage 2
# was compiled): SASRec capped at 40
# epochs, one stage-2 epoch at a 10x learning rate in place of more epochs, 300 sampled test rows (and
# every cold user). `paper`: a GPU budget (more stage-2 epochs, every test row). The A-LLMRec talk this
# project works from lists no hyperparameters; the authors' released code trains stage 2 for 5 epochs at
# lr 1e-4 in batches of 2, one row per user (README #6 measures 5 epochs on the cpu preset).
ALLMREC_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "sasrec_dim": 64,
        "sasrec_epochs": 40,
        "stage1_epochs": 10,
        "stage2_epochs": 1,
        "stage2_batch": 4,
        "stage2_lr": 1e-3,
        "prompt_history": 10,
        "compile_training": True,
        "rank_batch": 1,
        "test_rows": 300,
    },
    "paper": {
        "sasrec_dim": 64,
        "stage1_epochs": 10,
        "stage2_epochs": 5,
        "stage2_batch": 4,
        "prompt_history": 10,
        "rank_batch": 16,
    },
}


def allmrec_config(preset: str = "cpu", **overrides: Any) -> AllmrecConfig:
    if preset not in ALLMREC_PRESETS:
        raise CCFLLMError(f"Unknown preset {preset!r}; choose one of {sorted(ALLMREC_PRESETS)}.")
    return replace_checked(AllmrecConfig(), {**ALLMREC_PRESETS[preset], **overrides})
