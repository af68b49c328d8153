"""TALLRec with CF as text: the paper's pilot study (section 4.2, Table 2, "w/ CF"), which writes a CF
model's signal into TALLRec's prompt as words.

Prompt (prompt.py, layout 'cf-text'): the user-feature sentence becomes "Additionally, we have
information that users like these movies may also enjoy: {[sim_items]}.", the titles of the user's
top-10 items by the CF model among the test split's items. Left out of a user's list: the items the
user rated in training (the model would only repeat them). Stage 1 reads that prompt (`stage1_prompt`
'hybrid': the method's own); training and scoring are TALLRec's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cf.base import CFModel
from ..data.dataset import CTRDataset
from .method import CFSource, Method
from .tallrec import ANSWER_CE, NO_SECOND_STAGE, TEXT_ONLY_STRATEGIES


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


CF_AS_TEXT = CFSource("text", reads_backbone=True, ranking=similar_items)  # no CF position
TALLREC_CF = Method(
    "tallrec-cf",
    "TALLRec w/ CF as text",
    prompt="cf-text",
    cf_source=CF_AS_TEXT,
    loss=ANSWER_CE,
    strategies=TEXT_ONLY_STRATEGIES,
    strategy_note=NO_SECOND_STAGE,
    settings={"strategy": "stage1-only", "stage1_prompt": "hybrid"},
)
