"""CCF-LLM's training schedule, section 3.4, in one place: the stages each strategy runs (Table 4),
and for each stage what it trains, at which learning rate, on how many rows, reading which prompt;
and what a stage 1 depends on, so that runs that agree on it can share one (the runner does).

Stage 1 (LORA) updates only the LoRA weights Θ_L; stage 2 (FUSION) only ALG and GATE (Θ_A, Θ_G, and
the CF backbone Θ_E if asked) with the LLM frozen; ALL trains everything at once (the end-to-end row
of Table 4). How a stage trains (early stopping on valid AUC, resuming) is train.train_stage's.
"""

from __future__ import annotations

import enum

import torch

from .config import CCFConfig, to_dict
from .methods.ccf_llm import CCFLLM


class Stage(enum.Enum):
    LORA = "lora"
    FUSION = "fusion"
    ALL = "all"


STRATEGY_STAGES = {  # Table 4; zero-shot (Table 2) trains nothing
    "two-stage": (Stage.LORA, Stage.FUSION),
    "stage1-only": (Stage.LORA,),
    "end-to-end": (Stage.ALL,),
    "zero-shot": (),
}


def stages(strategy: str) -> list[Stage]:
    """The stages `strategy` runs, in order."""
    return list(STRATEGY_STAGES[strategy])


def trainable_parameters(model: CCFLLM, stage: Stage, tune_cf: bool) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains; return those parameters."""
    model.requires_grad_(False)
    chosen: list[torch.nn.Module] = []
    if stage in (Stage.LORA, Stage.ALL):
        lora = [p for name, p in model.llm.named_parameters() if "lora_" in name]
        for parameter in lora:
            parameter.requires_grad_(True)
    if stage in (Stage.FUSION, Stage.ALL):
        backbones = [f.backbone for f in (model.cf, model.second_cf) if f is not None] if tune_cf else []
        chosen = model.fusion_modules() + backbones
        for module in chosen:
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def learning_rate(config: CCFConfig, stage: Stage) -> float:
    return config.lr_lora if stage == Stage.LORA else config.lr_fusion


def training_rows(config: CCFConfig, stage: Stage) -> int:
    """How many train rows the stage samples (0: all)."""
    return config.train_rows if stage == Stage.LORA else config.fusion_rows


def trains_backbone(config: CCFConfig, stage: Stage) -> bool:
    """Whether the CF backbone trains (and so leaves eval mode: dropout) in `stage`."""
    return config.tune_cf and stage != Stage.LORA


def reads_text_prompt(config: CCFConfig, stage: Stage) -> bool:
    """Whether `stage` reads the text-only prompt rather than the method's: stage 1, where
    `stage1_prompt` says so."""
    return stage == Stage.LORA and config.stage1_prompt == "text"


# Settings that decide what stage 1 learns, when it reads the text-only prompt: two runs that agree on
# them train the same LoRA adapter, so one can reuse the other's (the runner shares it among variants).
STAGE1_SETTINGS = (
    "llm", "dtype", "loss", "loss_k", "lr_lora", "lr_schedule", "batch_size", "epochs", "train_rows",
    "valid_rows", "eval_every", "patience", "max_tokens", "max_history", "lora_targets", "lora_r",
    "lora_alpha", "lora_dropout", "seed", "stage1_prompt", "test_rows",
)  # fmt: skip


def stage1_signature(config: CCFConfig | dict) -> dict | None:
    """What stage 1 depends on, or None where it depends on more (a hybrid stage-1 prompt reads the
    method's CF positions), does not end with the saved adapter (end-to-end) or does not exist."""
    settings = config if isinstance(config, dict) else to_dict(config)
    if settings["stage1_prompt"] != "text" or settings["strategy"] in ("end-to-end", "zero-shot"):
        return None
    defaults = to_dict(CCFConfig())  # a run saved before a setting existed ran with its default
    return {key: settings.get(key, defaults[key]) for key in STAGE1_SETTINGS}
