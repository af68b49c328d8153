"""What a trained CCF-LLM does, seen from inside (paper section 4.6): the three views of an item that
Figure 4 projects with t-SNE, and Table 5's case study of one user's test items ranked three ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cf.train import predict_split
from .data.dataset import CTRDataset
from .engine import score_rows
from .errors import CCFLLMError
from .io import new_figure, save_png
from .methods.ccf_llm import fuse
from .recommender import Recommender

VIEWS = ("aligned CF", "LLM title", "fused")


@torch.no_grad()
def item_views(recommender: Recommender, dataset: CTRDataset, n_items: int = 1000, seed: int = 0) -> dict:
    """For `n_items` items (a seeded sample of those with a CF embedding and a title): ALG(x_i^CF), the
    mean of the title tokens' input embeddings x_i^SM[t], and the mean of the fused tokens (Eq. 4).
    -> {view: (n, d) float32 array, "iid": (n,) ids}"""
    model, prompts = recommender.model, recommender.hybrid_prompts
    if prompts.layout != "fused":
        raise CCFLLMError(f"Figure 4 shows CCF-LLM's fused tokens; this run is {recommender.config.method}.")
    known = model.cf.known_items.cpu().numpy()
    titled = np.array([len(prompts.title_tokens(i)) > 0 if i > 0 else False for i in range(len(known))])
    candidates = np.flatnonzero(known & titled)
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, min(n_items, len(candidates)), False))
    device = next(model.parameters()).device
    embed = model.llm.get_input_embeddings()
    views: dict[str, list] = {view: [] for view in VIEWS}
    for iid in chosen:
        ids = torch.as_tensor(prompts.title_tokens(int(iid)), device=device)
        titles = embed(ids).float()  # (T, d)
        aligned = model.alignment(model.cf.items(torch.full((len(ids),), int(iid), device=device)).float())
        fused = fuse(titles, aligned, model.gate(aligned, titles))
        views["aligned CF"].append(aligned[0])
        views["LLM title"].append(titles.mean(0))
        views["fused"].append(fused.mean(0))
    return {"iid": chosen, **{view: torch.stack(rows).cpu().numpy() for view, rows in views.items()}}


def tsne_figure(views: dict, path: Path, seed: int = 0) -> None:
    """One t-SNE of the three views together, coloured by view (Figure 4)."""
    from sklearn.manifold import TSNE

    points = np.concatenate([views[view] for view in VIEWS])
    # each view on its own scale, so that t-SNE compares shapes rather than norms
    points = np.concatenate(
        [v / np.linalg.norm(v, axis=1, keepdims=True).mean() for v in np.split(points, len(VIEWS))]
    )
    flat = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(points)
    figure, axis = new_figure(figsize=(5.5, 5))
    for view, part in zip(VIEWS, np.split(flat, len(VIEWS)), strict=True):
        axis.scatter(part[:, 0], part[:, 1], s=4, alpha=0.6, label=view)
    axis.legend(markerscale=4)
    axis.set_title(f"t-SNE of {len(views['iid'])} items' embeddings")
    axis.set_xticks([])
    axis.set_yticks([])
    save_png(figure, path, dpi=120)


def case_study(
    recommender: Recommender, dataset: CTRDataset, n_items: int = 5, seed: int = 0
) -> pd.DataFrame:
    """Table 5: a test user with at least `n_items` test rows of both labels (seeded choice), and
    `n_items` of their rows ranked by the CF backbone, the zero-shot LLM (the adapter off, TALLRec's
    prompt) and CCF-LLM. -> one row per item: uid, iid, title, label, and each scorer's rank (1 = best)."""
    test = dataset.test
    frame = pd.DataFrame({"uid": test.uid, "label": test.label})
    counts = frame.groupby("uid")["label"].agg(["size", "nunique"])
    users = counts.index[(counts["size"] >= n_items) & (counts["nunique"] == 2)].to_numpy()
    generator = np.random.default_rng(seed)
    user = int(generator.choice(users))
    own = np.flatnonzero(test.uid == user)
    positives, negatives = own[test.label[own] == 1], own[test.label[own] == 0]
    rows = np.sort(np.concatenate([generator.choice(positives, 1), generator.choice(negatives, 1)]))
    rest = np.setdiff1d(own, rows)
    rows = np.sort(np.concatenate([rows, generator.choice(rest, n_items - len(rows), replace=False)]))
    split = test.take(rows)
    model = recommender.model
    backbone = model.cf.backbone
    with model.llm.disable_adapter():
        zero_shot = score_rows(model, recommender.text_prompts, split, batch_size=len(rows))
    scores = {
        "CF backbone": predict_split(backbone, split),
        "zero-shot LLM": zero_shot,
        "CCF-LLM": score_rows(model, recommender.final_prompts(), split, batch_size=len(rows)),
    }
    table = pd.DataFrame(
        {
            "uid": split.uid,
            "iid": split.iid,
            "title": [dataset.item_titles[i] for i in split.iid],
            "label": split.label,
        }
    )
    for name, values in scores.items():
        table[f"rank by {name}"] = (-np.asarray(values)).argsort().argsort() + 1
    return table
