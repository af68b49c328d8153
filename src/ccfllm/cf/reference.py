"""The non-learned reference a CF backbone must beat: each user's and each item's mean label on train,
smoothed toward the global mean with `k` pseudo-rows, combined in logit space (naive Bayes style):
logit p(u, i) = logit m_u + logit m_i - logit g. An id absent from train gets the global mean g."""

from __future__ import annotations

import numpy as np

from ..data.dataset import CTRDataset, Split
from ..metrics import logit


def smoothed_means(ids: np.ndarray, labels: np.ndarray, size: int, k: float) -> np.ndarray:
    """(sum of labels + k·g) / (count + k) for every id below `size`. -> (size,)"""
    prior = labels.mean()
    positives = np.bincount(ids, weights=labels, minlength=size)
    counts = np.bincount(ids, minlength=size)
    return (positives + k * prior) / (counts + k)


def reference_scores(dataset: CTRDataset, split: Split, k: float = 5.0) -> np.ndarray:
    """Click scores of the reference for every row of `split`, from train labels only. -> (N,)"""
    train = dataset.train
    labels = train.label.astype(np.float64)
    prior = labels.mean()
    user_mean = smoothed_means(train.uid, labels, dataset.n_users, k)
    item_mean = smoothed_means(train.iid, labels, dataset.n_items, k)
    return logit(user_mean[split.uid]) + logit(item_mean[split.iid]) - logit(prior)
