"""A CCF-LLM score taken apart: how much of it came from the CF signal and how much from the text.

GATE's alpha (Eq. 3) at every title token says how much of ALG(x^CF) each token takes in (Eq. 4); the
same row scored with every x^CF zero, and with the title tokens' text embeddings zero, says what each
side carries on its own; the CF backbone's score stands beside them. `CCFRecommender.explain` asks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import CCFLLMError

if TYPE_CHECKING:
    from .api import CCFRecommender


@dataclass
class Explanation:
    """How much of one row's score came from CF and how much from the text."""

    uid: int
    iid: int
    score: float  # the model's score of the row, as it reads it
    score_without_cf: float  # every x^CF a zero vector (the user token is ALG(0), Eq. 2; no fused CF)
    score_without_text: float | None  # the title tokens' text embeddings x^SM zeroed (None: no title tokens)
    cf_backbone_score: float | None  # the CF backbone alone, sigmoid of its logit (None: no CF for the row)
    cf: str  # which side had a CF embedding: user+item, user only, item only, none
    tokens: list[dict] = field(default_factory=list)  # per title token: position, token, item, alpha
    items: list[dict] = field(default_factory=list)  # per item of the prompt: item, title, role, alpha

    def to_dict(self) -> dict:
        return asdict(self)


def explain(recommender: CCFRecommender, uid: int, iid: int, history: list[int] | None = None) -> Explanation:
    """One row's score taken apart: GATE's alpha magnitude (mean |alpha| over the LLM's dimensions,
    Eq. 3) at every title token of the prompt and per item; the score with the CF embeddings
    withheld (every x^CF zero) and with the title text withheld (every title token's x^SM zero,
    so a fused token carries alpha ⊙ ALG(x^CF) alone, Eq. 4); and the CF backbone's own score."""
    import torch

    from .data.dataset import pad_histories
    from .methods.ccf_llm import recording_alpha
    from .prompt import ITEM

    model = recommender.run.model
    if model.cf is None:
        raise CCFLLMError(
            f"Method {recommender.method!r} reads no CF signal: there is no CF share to explain."
        )
    cf = recommender.score(pd.DataFrame({"uid": [uid], "iid": [iid], "history": [history]}))["cf"].iloc[0]
    prompts = recommender.run.final_prompts()
    liked = recommender.liked_history(uid) if history is None else list(history)
    rows = pad_histories([liked], recommender.run.config.max_history or 1)
    device = next(model.parameters()).device
    batch = prompts.batch([uid], [iid], rows).to(device)
    encoded = prompts.encode(iid, rows[0], uid)
    with torch.no_grad():
        with recording_alpha(model.gate) as alphas:
            score = _forward_score(model, batch)
        with _cf_withheld(model):
            without_cf = _forward_score(model, batch)
        has_titles = bool((batch.kind == ITEM).any())
        without_text = None
        if has_titles:
            with _title_text_withheld(model, batch.kind == ITEM):
                without_text = _forward_score(model, batch)
    alpha = alphas[0].abs().mean(-1).double().cpu().numpy() if alphas else np.zeros(0)
    tokens = _token_alphas(recommender, encoded, alpha)
    both_known = cf == "user+item" and recommender.backbone() is not None
    backbone_score = (
        float(recommender.backbone_scores(uid, np.array([iid]), liked)[0]) if both_known else None
    )
    return Explanation(
        uid=uid,
        iid=iid,
        score=score,
        score_without_cf=without_cf,
        score_without_text=without_text,
        cf_backbone_score=backbone_score,
        cf=str(cf),
        tokens=tokens,
        items=_item_alphas(recommender, tokens, iid),
    )


def _forward_score(model, batch) -> float:
    return float(model.click_score(model(batch)).double().item())


def _token_alphas(recommender: CCFRecommender, encoded, alpha: np.ndarray) -> list[dict]:
    from .prompt import ITEM

    positions = np.flatnonzero(encoded.kind == ITEM)
    if len(alpha) != len(positions):  # a layout without fused title tokens (CoLLM's slots)
        alpha = np.full(len(positions), np.nan)
    tokenizer = recommender.run.llm.tokenizer
    words = tokenizer.convert_ids_to_tokens(encoded.input_ids[positions].tolist())
    return [
        {"position": int(p), "token": str(w), "item": int(encoded.item[p]), "alpha": _number(a)}
        for p, w, a in zip(positions, words, alpha, strict=True)
    ]


def _item_alphas(recommender: CCFRecommender, tokens: list[dict], target: int) -> list[dict]:
    """Mean alpha over each item's title tokens, items in prompt order; the target last."""
    order = list(dict.fromkeys(t["item"] for t in tokens))
    items = []
    for item in order:
        values = [t["alpha"] for t in tokens if t["item"] == item and t["alpha"] is not None]
        role = "target" if item == target and item == order[-1] else "history"
        alpha = float(np.mean(values)) if values else None
        items.append({"item": item, "title": recommender.title(item), "role": role, "alpha": alpha})
    return items


def _zero_features(features):
    """A module in place of CFFeatures that gives every user and item a zero vector of its width."""
    import torch

    class ZeroFeatures(torch.nn.Module):
        trainable = False

        def __init__(self):
            super().__init__()
            self.dim = features.dim
            self.known_users, self.known_items = features.known_users, features.known_items

        def users(self, uid, history):
            return torch.zeros(len(uid), self.dim, device=uid.device)

        def items(self, iid):
            return torch.zeros(len(iid), self.dim, device=iid.device)

    return ZeroFeatures()


@contextlib.contextmanager
def _cf_withheld(model) -> Iterator[None]:
    """Inside the block the model reads zero CF features, from both backbones where it fuses two."""
    saved = model.cf, model.second_cf
    try:
        model.cf = _zero_features(saved[0])
        if saved[1] is not None:
            model.second_cf = _zero_features(saved[1])
        yield
    finally:
        model.cf = saved[0]
        if saved[1] is not None:
            model.second_cf = saved[1]


@contextlib.contextmanager
def _title_text_withheld(model, title_positions) -> Iterator[None]:
    """Inside the block the LLM's input embeddings are zero at `title_positions` (B, T): the title
    tokens' x^SM, so GATE and the fusion see no text there."""
    keep = (~title_positions).unsqueeze(-1)
    embeddings = model.llm.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, inputs, output: output * keep.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


def _number(value) -> float | None:
    return None if value is None or np.isnan(value) else float(value)
