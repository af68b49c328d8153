"""CTR metrics: AUC over all rows, CoLLM's UAUC, the paper's RelaImpr (Eq. 6). Next-item ranking
(A-LLMRec): Hit@k and NDCG@k of the answer's rank among its candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)): a probability back to the score it came from."""
    return np.log(p) - np.log1p(-p)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve over all rows; ties count one half."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("AUC needs both labels (0 and 1) among the rows; this set has only one.")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean of per-user AUCs over the users that have both labels (as CoLLM computes it)."""
    frame = pd.DataFrame(
        {"user": np.asarray(users), "label": np.asarray(labels), "score": np.asarray(scores)}
    )
    per_user = [
        roc_auc_score(group["label"], group["score"].astype(np.float64))
        for _, group in frame.groupby("user", sort=True)
        if group["label"].nunique() == 2
    ]
    if not per_user:
        raise ValueError("UAUC needs at least one user with both labels; there is none.")
    return float(np.mean(per_user))


def rela_impr(auc_model: float, auc_base: float) -> float:
    """Eq. 6: relative improvement over a base model, in percent."""
    if auc_base == 0.5:
        raise ValueError("RelaImpr is undefined against a base model with AUC 0.5.")
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def split_metrics(uids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC and UAUC of one split's scores, the pair every table in this project reports."""
    return {"auc": auc(labels, scores), "uauc": uauc(uids, labels, scores)}


def target_ranks(scores: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """0-based rank of each row's answer among its candidates' scores, ties counted against the answer
    (a scorer that cannot tell candidates apart earns no hits). (N, C), (N,) -> (N,)"""
    scores = np.asarray(scores, dtype=np.float64)
    own = scores[np.arange(len(scores)), answer][:, None]
    return (scores >= own).sum(axis=1) - 1


def hit_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of rows whose answer is among the top k (Hit@1 is A-LLMRec's headline metric)."""
    return float((np.asarray(ranks) < k).mean())


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant candidate: 1 / log2(rank + 2) inside the top k, else 0, averaged."""
    ranks = np.asarray(ranks)
    return float(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
