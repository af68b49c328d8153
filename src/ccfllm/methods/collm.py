"""CoLLM (Zhang et al. 2023), the baseline CCF-LLM improves on, as its authors' code runs it.

Prompt (prompt.py, layout 'slots'): each item keeps its title as text and gets one extra position
right after it, [text_i][emb_i]; the [User] position carries the user. Both extra embeddings are the
CF embeddings mapped into the LLM's space by an MLP (this package's ALG, Eq. 2 of CCF-LLM), with no
gate and no fusion into the title tokens. The words around them are CCF-LLM's template, so that the
comparison isolates how the CF signal enters.

Training, CoLLM's two steps: LoRA on the text-only prompt, then the mapping alone with the LLM frozen
(`two-stage` with the text stage-1 prompt). CoLLM's code trains and scores with the logit of the
"Yes" token at the answer position: BCE-with-logits on it, no "No" term, no BPR. That is the default
here (`loss=yes-logit`); `loss=eq5` switches on CCF-LLM's Eq. 5 and its normalised p_yes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ccf_llm import BACKBONE, Answer
from .method import Loss, Method


def collm_loss(answer: Answer, label: torch.Tensor, k: float = 0.0) -> torch.Tensor:
    """BCE-with-logits on the "Yes" logit (k is unused: CoLLM has no BPR term)."""
    return F.binary_cross_entropy_with_logits(answer.yes_logit, label)


def yes_logit_score(answer: Answer) -> torch.Tensor:
    """sigmoid of the "Yes" logit: the probability CoLLM's loss trains."""
    return torch.sigmoid(answer.yes_logit)


YES_LOGIT = Loss("yes-logit", collm_loss, yes_logit_score)
COLLM = Method("collm", "CoLLM", prompt="slots", cf_source=BACKBONE, loss=YES_LOGIT)
