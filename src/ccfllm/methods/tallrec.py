"""TALLRec (Bao et al. 2023): instruct-tuning an LLM with LoRA on a text-only prompt.

Prompt (prompt.py, `with_cf=False`): the titles of the user's liked history and the target's title,
in CCF-LLM's words without the user-feature sentence. Training: LoRA only (`stage1-only`), with
TALLRec's language-model loss on the answer token, the cross-entropy of "Yes" for a positive row and
"No" for a negative one under the full-vocabulary softmax. Scoring: p_yes / (p_yes + p_no), the
softmax over the two answer tokens, as TALLRec evaluates.
"""

from __future__ import annotations

import torch

from .ccf_llm import Answer


def tallrec_loss(answer: Answer, label: torch.Tensor, k: float = 0.0) -> torch.Tensor:
    """-log p(the right answer token), averaged over the batch (k is unused)."""
    return -(label * answer.log_p_yes + (1 - label) * answer.log_p_no).mean()
