"""TALLRec (Bao et al. 2023): instruct-tuning an LLM with LoRA on a text-only prompt.

Prompt (prompt.py, layout 'text'): the titles of the user's liked history and the target's title, in
CCF-LLM's words without the user-feature sentence. Training: LoRA only (`stage1-only`), with TALLRec's
language-model loss on the answer token, the cross-entropy of "Yes" for a positive row and "No" for a
negative one under the full-vocabulary softmax. Scoring: p_yes / (p_yes + p_no), the softmax over the
two answer tokens, as TALLRec evaluates. Zero-shot (`strategy=zero-shot`) scores with the untuned LLM.
The pilot study's variant with a CF model's items written into the prompt: tallrec_cf.py.
"""

from __future__ import annotations

import torch

from .ccf_llm import Answer, normalised_p_yes
from .method import NO_CF, Loss, Method


def tallrec_loss(answer: Answer, label: torch.Tensor, k: float = 0.0) -> torch.Tensor:
    """-log p(the right answer token), averaged over the batch (k is unused)."""
    return -(label * answer.log_p_yes + (1 - label) * answer.log_p_no).mean()


ANSWER_CE = Loss("answer-ce", tallrec_loss, normalised_p_yes)
# A text prompt has no CF position for a second stage to train.
TEXT_ONLY_STRATEGIES = ("stage1-only", "zero-shot")
NO_SECOND_STAGE = "has no CF positions to train in a second stage"
TALLREC = Method(
    "tallrec",
    "TALLRec",
    prompt="text",
    cf_source=NO_CF,
    loss=ANSWER_CE,
    strategies=TEXT_ONLY_STRATEGIES,
    strategy_note=NO_SECOND_STAGE,
    settings={"strategy": "stage1-only"},
)
