"""TALLRec (Bao et al. 2023): instruct-tuning an LLM with LoRA on a text-only prompt; and the paper's
pilot study (section 4.2, Table 2), which writes a CF model's signal into that prompt as text.

Prompt (prompt.py, `with_cf=False`): the titles of the user's liked history and the target's title,
in CCF-LLM's words without the user-feature sentence. Training: LoRA only (`stage1-only`), with
TALLRec's language-model loss on the answer token, the cross-entropy of "Yes" for a positive row and
"No" for a negative one under the full-vocabulary softmax. Scoring: p_yes / (p_yes + p_no), the
softmax over the two answer tokens, as TALLRec evaluates.

`tallrec-cf` (Table 2, "w/ CF"): the user-feature sentence of the prompt becomes "Additionally, we have
information that users like these movies may also enjoy: {[sim_items]}.", the titles of the user's
top-10 items by the CF model among the test split's items. Left out of a user's list: the items the
user rated in training (the model would only repeat them). Zero-shot (`strategy=zero-shot`) scores
with the untuned LLM.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cf.base import CFModel
from ..data.dataset import CTRDataset
from .ccf_llm import Answer


def tallrec_loss(answer: Answer, label: torch.Tensor, k: float = 0.0) -> torch.Tensor:
    """-log p(the right answer token), averaged over the batch (k is unused)."""
    return -(label * answer.log_p_yes + (1 - label) * answer.log_p_no).mean()


@torch.no_grad()
def similar_items(backbone: CFModel, dataset: CTRDataset, k: int = 10) -> dict[int, list[int]]:
    """uid -> the k test-split items the backbone scores highest for the user, best first."""
    backbone = backbone.eval()
    device = next(backbone.parameters()).device
    candidates = torch.as_tensor(np.unique(dataset.test.iid), device=device)
    latest = {}  # each user's liked history as of their last training row
    for row, uid in enumerate(dataset.train.uid):
        latest[int(uid)] = row
    users = torch.as_tensor(sorted(latest), device=device)
    history = torch.as_tensor(dataset.train.history[[latest[int(u)] for u in users]], device=device)
    scores = backbone.user_embedding(users, history) @ backbone.item_embedding(candidates).T  # (U, C)
    scores = scores + backbone.item_bias(candidates).squeeze(-1)  # the user's own bias ranks nothing
    rated = {(int(u), int(i)) for u, i in zip(dataset.train.uid, dataset.train.iid, strict=True)}
    ranked = torch.argsort(scores, dim=1, descending=True).cpu().numpy()
    ids = candidates.cpu().numpy()
    result = {}
    for user, order in zip(users.tolist(), ranked, strict=True):
        result[user] = [int(i) for i in ids[order] if (user, int(i)) not in rated][:k]
    return result
