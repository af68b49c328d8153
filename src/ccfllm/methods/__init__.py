"""The LLM recommenders, as data: what prompt each reads, where its CF features come from, and how it
trains and scores. All run on one model (ccf_llm.CCFLLM), one training loop and one engine; each
method's own idea lives in its module:

  ccf-llm     ccf_llm.py     title tokens fused with ALG(x^CF) through GATE (Eqs. 2-4), loss Eq. 5
  tallrec     tallrec.py     text-only prompt, LoRA, cross-entropy on the answer token
  tallrec-cf  tallrec.py     TALLRec with the CF model's top items written into the prompt (Table 2)
  collm       collm.py       an extra slot per item carrying ALG(x^CF), BCE on the "Yes" logit
  softprompt  softprompt.py  CoLLM's slots, filled from free trainable tables instead of a CF model

The settings each method changes (its loss, its strategy) are data in config.METHOD_SETTINGS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import LOSSES as LOSS_NAMES
from ..config import METHOD_SETTINGS
from .ccf_llm import Answer, eq5_loss, normalised_p_yes
from .collm import collm_loss, yes_logit_score
from .tallrec import tallrec_loss

# no CF position; CF in the title tokens; CoLLM's extra slots; the CF model's top items as titles
PROMPTS = ("text", "fused", "slots", "cf-text")
CF_SOURCES = ("none", "backbone", "free", "text")  # "text": a backbone's ranking, read as words


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # how tables name it
    prompt: str  # what its CF-carrying stages read (stage 1 may read text: CCFConfig.stage1_prompt)
    cf_source: str  # where the CF features come from


@dataclass(frozen=True)
class Loss:
    train: Callable[[Answer, torch.Tensor, float], torch.Tensor]  # (answer, label, k) -> scalar
    score: Callable[[Answer], torch.Tensor]  # answer -> click score in [0, 1], (B,)


def _registry(entries: list, key: Callable) -> dict:
    registry: dict = {}
    for entry in entries:
        name = key(entry)
        if name in registry:
            raise ValueError(f"{name!r} is registered twice.")
        registry[name] = entry
    return registry


METHODS: dict[str, Method] = _registry(
    [
        Method("ccf-llm", "CCF-LLM", prompt="fused", cf_source="backbone"),
        Method("tallrec", "TALLRec", prompt="text", cf_source="none"),
        Method("tallrec-cf", "TALLRec w/ CF as text", prompt="cf-text", cf_source="text"),
        Method("collm", "CoLLM", prompt="slots", cf_source="backbone"),
        Method("softprompt", "Softprompt", prompt="slots", cf_source="free"),
    ],
    key=lambda method: method.name,
)
LOSSES: dict[str, Loss] = {
    "eq5": Loss(eq5_loss, normalised_p_yes),
    "yes-logit": Loss(collm_loss, yes_logit_score),
    "answer-ce": Loss(tallrec_loss, normalised_p_yes),
}
if set(METHODS) != set(METHOD_SETTINGS) or set(LOSSES) != set(LOSS_NAMES):
    raise RuntimeError("config.METHOD_SETTINGS / config.LOSSES and the method registry disagree.")
if any(m.prompt not in PROMPTS or m.cf_source not in CF_SOURCES for m in METHODS.values()):
    raise RuntimeError(f"A method names an unknown prompt or CF source; known: {PROMPTS}, {CF_SOURCES}.")


def uses_backbone(method: Method) -> bool:
    """Whether the method needs a trained CF backbone (as embeddings, or for its ranking as text)."""
    return method.cf_source in ("backbone", "text")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; choose one of {list(METHODS)}.")
    return METHODS[name]
