"""CTR metrics: AUC over all rows, CoLLM's UAUC, the paper's RelaImpr (Eq. 6), and a paired bootstrap
of the difference between two scorers on the same rows. Next-item ranking (A-LLMRec): Hit@k and NDCG@k
of the answer's rank among its candidates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
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


@dataclass(frozen=True)
class Difference:
    """One scorer's metric minus another's on the same rows, with a 95% bootstrap interval."""

    difference: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(
    labels: np.ndarray,
    uids: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Difference]:
    """{"auc", "uauc"}: A's metric minus B's on these rows, and the 2.5 / 97.5 percentiles of that
    difference over `n_resamples` cluster resamples: users drawn with replacement, each with all their
    rows, the same draw for A and B (paired). Drawing users, not rows, keeps the rows of one user
    together, so their correlation widens the interval as it should, and gives UAUC an interval too
    (a user drawn twice counts twice; users with one class are skipped, as in `uauc`). The point
    differences are `auc` and `uauc` exactly."""
    labels, scores_a, scores_b = (np.asarray(x) for x in (labels, scores_a, scores_b))
    users, user_of_row = np.unique(np.asarray(uids), return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(users), size=(n_resamples, len(users)))
    counts = _draw_counts(draws, len(users))  # (R, U): how often each user is drawn
    differences = {
        "auc": _resampled_aucs(labels, user_of_row, scores_a, counts)
        - _resampled_aucs(labels, user_of_row, scores_b, counts),
        "uauc": _resampled_uaucs(labels, user_of_row, scores_a, scores_b, counts),
    }
    points = {
        "auc": auc(labels, scores_a) - auc(labels, scores_b),
        "uauc": _uauc_or_nan(uids, labels, scores_a) - _uauc_or_nan(uids, labels, scores_b),
    }
    return {name: Difference(float(points[name]), *_interval(differences[name])) for name in points}


def bootstrap_intervals(
    labels: np.ndarray, uids: np.ndarray, scores: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """{"auc", "uauc"}: the 2.5 / 97.5 percentiles of one scorer's metric over `n_resamples` draws of
    users with replacement (each with all their rows, as `paired_bootstrap` draws them): how far a
    figure measured on a sample of rows may be from the same model's on the population they came from."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    users, user_of_row = np.unique(np.asarray(uids), return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(users), size=(n_resamples, len(users)))
    counts = _draw_counts(draws, len(users))
    per_user = _per_user_aucs(labels, user_of_row, scores)
    return {
        "auc": _interval(_resampled_aucs(labels, user_of_row, scores, counts)),
        "uauc": _interval(_weighted_user_mean(per_user, counts)),
    }


def _uauc_or_nan(uids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """UAUC, or NaN where no user has both labels (one row per user: a bootstrap of single rows)."""
    try:
        return uauc(uids, labels, scores)
    except ValueError:
        return float("nan")


def _interval(values: np.ndarray) -> tuple[float, float]:
    """The middle 95% of the resampled differences, leaving out resamples where the metric is undefined
    (no positive or no negative row drawn; no user with both labels)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _draw_counts(draws: np.ndarray, n_users: int) -> np.ndarray:
    """(R, U) user indices drawn -> (R, U) how many times each user was drawn in each resample."""
    offsets = np.arange(len(draws))[:, None] * n_users
    return np.bincount((draws + offsets).ravel(), minlength=draws.size).reshape(draws.shape).astype(float)


def _resampled_aucs(
    labels: np.ndarray, user_of_row: np.ndarray, scores: np.ndarray, counts: np.ndarray, block: int = 256
) -> np.ndarray:
    """AUC in each resample, every row weighted by its user's count: the share of (positive, negative)
    weight pairs that the scores order right, ties counting one half, from one sort of the scores.
    -> (R,)"""
    _, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)  # tied scores share one
    n_groups, n_users = group.max() + 1, counts.shape[1]
    # (U, G): how many positive / negative rows of each user have each distinct score
    by_label = [
        sparse.csr_matrix((np.ones(mask.sum()), (user_of_row[mask], group[mask])), shape=(n_users, n_groups))
        for mask in (labels == 1, labels == 0)
    ]
    aucs = []
    for start in range(0, len(counts), block):  # a block of resamples at a time bounds the memory
        weights = counts[start : start + block].T  # (U, B)
        positive, negative = (np.asarray(m.T @ weights) for m in by_label)  # (G, B) weight per score
        below = np.cumsum(negative, axis=0) - negative  # negative weight under each score
        right = (positive * (below + 0.5 * negative)).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without one class: NaN
            aucs.append(right / (positive.sum(axis=0) * negative.sum(axis=0)))
    return np.concatenate(aucs)


def _resampled_uaucs(
    labels: np.ndarray, user_of_row: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, counts
) -> np.ndarray:
    """UAUC(A) - UAUC(B) in each resample: a user's AUC does not change when the user is drawn (all
    their rows come along), so each resample is a count-weighted mean of per-user differences. -> (R,)"""
    per_user = _per_user_aucs(labels, user_of_row, scores_a) - _per_user_aucs(labels, user_of_row, scores_b)
    return _weighted_user_mean(per_user, counts)


def _weighted_user_mean(per_user: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(U,) a value per user, NaN for users without both labels; (R, U) draw counts -> (R,) the
    count-weighted mean over the users with both labels in each resample."""
    both = ~np.isnan(per_user)
    weights = counts[:, both]
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights @ per_user[both] / weights.sum(axis=1)


def _per_user_aucs(labels: np.ndarray, user_of_row: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each user's AUC from the Mann-Whitney rank sum (mid-ranks for ties); NaN for a user with one
    class. -> (U,)"""
    frame = pd.DataFrame({"user": user_of_row, "label": labels, "score": np.asarray(scores, np.float64)})
    frame["rank"] = frame.groupby("user")["score"].rank(method="average")
    frame["positive_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user").agg(
        n=("label", "size"), pos=("label", "sum"), ranks=("positive_rank", "sum")
    )
    pos, neg = per_user["pos"].to_numpy(float), (per_user["n"] - per_user["pos"]).to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (per_user["ranks"].to_numpy() - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), values, np.nan)


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
