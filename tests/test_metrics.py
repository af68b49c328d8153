"""Metrics against values computed by hand."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ccfllm.metrics import auc, paired_bootstrap, rela_impr, split_metrics, uauc


def test_auc_counts_ordered_pairs_and_half_ties():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)  # one tie counts 1/2


def test_auc_refuses_a_single_label():
    with pytest.raises(ValueError, match="both labels"):
        auc([1, 1], [0.2, 0.3])


def test_uauc_is_the_unweighted_mean_over_users_with_both_labels():
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([0, 1, 1, 0, 1, 1, 1])  # user 3 has only positives: left out
    scores = np.array([0.2, 0.1, 0.9, 0.3, 0.6, 0.0, 0.0])
    # user 1: 0.9 > 0.2 but 0.1 < 0.2 -> 0.5; user 2: 1.0; mean 0.75 (row-weighted would differ)
    assert uauc(users, labels, scores) == pytest.approx(0.75)
    assert split_metrics(users, labels, scores) == pytest.approx({"auc": auc(labels, scores), "uauc": 0.75})


def test_uauc_refuses_when_no_user_has_both_labels():
    with pytest.raises(ValueError, match="at least one user"):
        uauc([1, 2], [0, 1], [0.1, 0.9])


def test_rela_impr_matches_the_papers_definition():
    assert rela_impr(0.75, 0.7) == pytest.approx(25.0)
    assert rela_impr(0.65, 0.7) == pytest.approx(-25.0)
    # Table 3 of the paper, ML-1M: CCF-LLM (MF) 0.7315 over MF 0.6482 is +56.21 %, LightGCN's +153.08 %
    assert rela_impr(0.7315, 0.6482) == pytest.approx(56.21, abs=0.005)
    assert rela_impr(0.7427, 0.5959) == pytest.approx(153.08, abs=0.005)
    with pytest.raises(ValueError):
        rela_impr(0.7, 0.5)


def test_reference_smooths_user_and_item_means_toward_the_global_mean(tiny_dataset):
    from ccfllm.cf.reference import reference_scores, smoothed_means

    # id 1: labels 1, 1, 0; id 2: label 0; global mean 0.5; k = 2 -> (2 + 1) / 5 and (0 + 1) / 3
    ids, labels = np.array([1, 1, 1, 2, 2, 2]), np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(smoothed_means(ids[:4], labels[:4], 4, k=2.0), [0.5, 0.6, 1 / 3, 0.5])
    # on the tiny data, the same by pandas: per-user and per-item smoothed means, combined in logit space
    train = tiny_dataset.train.frame()
    g = train["label"].mean()
    user = train.groupby("uid")["label"].agg(lambda s: (s.sum() + 5 * g) / (len(s) + 5))
    item = train.groupby("iid")["label"].agg(lambda s: (s.sum() + 5 * g) / (len(s) + 5))
    test = tiny_dataset.test.frame()
    item_means = test["iid"].map(item).fillna(g).to_numpy()
    expected = logit(user[test["uid"]].to_numpy()) + logit(item_means) - logit(g)
    np.testing.assert_allclose(reference_scores(tiny_dataset, tiny_dataset.test, k=5.0), expected)


def logit(p):
    return np.log(p / (1 - p))


# -- the paired bootstrap ---------------------------------------------------------------------------


def clustered_rows(n_users: int = 40, rows_per_user: int = 20, seed: int = 0):
    """Users whose rows go together: for half of them A orders every row right and B is noise, for the
    other half the reverse. -> labels, uids, scores_a, scores_b"""
    rng = np.random.default_rng(seed)
    uids = np.repeat(np.arange(n_users), rows_per_user)
    labels = np.tile(np.arange(rows_per_user) % 2, n_users)
    noise = rng.random((2, len(uids)))
    a_knows = (uids % 2 == 0).astype(float)
    scores_a = a_knows * labels + noise[0]
    scores_b = (1 - a_knows) * labels + noise[1]
    return labels, uids, scores_a, scores_b


def test_resampled_aucs_are_sklearns_with_each_row_weighted_by_its_users_count():
    from ccfllm.metrics import _draw_counts, _per_user_aucs, _resampled_aucs

    labels, uids, scores, _ = clustered_rows(n_users=12, rows_per_user=7)
    scores = np.round(scores, 1)  # ties, which count one half
    counts = _draw_counts(np.random.default_rng(3).integers(0, 12, size=(5, 12)), 12)
    assert counts.sum(axis=1).tolist() == [12] * 5
    expected = [roc_auc_score(labels, scores, sample_weight=row[uids]) for row in counts]
    np.testing.assert_allclose(_resampled_aucs(labels, uids, scores, counts, block=2), expected, rtol=1e-12)
    per_user = [roc_auc_score(labels[uids == u], scores[uids == u]) for u in range(12)]
    np.testing.assert_allclose(_per_user_aucs(labels, uids, scores), per_user, rtol=1e-12)


def test_identical_scores_differ_by_exactly_zero_with_interval_zero():
    labels, uids, scores, _ = clustered_rows()
    result = paired_bootstrap(labels, uids, scores, scores.copy(), n_resamples=200)
    for name in ("auc", "uauc"):
        assert (result[name].difference, result[name].low, result[name].high) == (0.0, 0.0, 0.0)
    assert result["auc"].text() == "+0.0000 [+0.0000, +0.0000]"


def test_a_scorer_better_on_every_user_has_an_interval_above_zero():
    labels, uids, _, noise = clustered_rows()
    better = labels + 0.5 * noise  # orders most rows of every user right; `noise` alone is chance
    result = paired_bootstrap(labels, uids, better, noise, n_resamples=500)
    assert result["auc"].difference == auc(labels, better) - auc(labels, noise)
    assert result["uauc"].difference == uauc(uids, labels, better) - uauc(uids, labels, noise)
    for name in ("auc", "uauc"):
        assert 0 < result[name].low < result[name].difference < result[name].high
    reversed_ = paired_bootstrap(labels, uids, noise, better, n_resamples=500)
    assert reversed_["auc"].high < 0  # B minus A: the same interval, below zero


def test_the_bootstrap_is_reproducible_from_its_seed():
    labels, uids, a, b = clustered_rows()
    first, again = (paired_bootstrap(labels, uids, a, b, n_resamples=300, seed=7) for _ in range(2))
    assert first == again
    assert paired_bootstrap(labels, uids, a, b, n_resamples=300, seed=8) != first


def test_drawing_users_widens_the_interval_where_a_users_rows_go_together():
    """A is right on half of the users and B on the other half: how many of each half a resample draws
    moves the difference, which a bootstrap of single rows (each row its own user) does not see."""
    labels, uids, a, b = clustered_rows()
    by_user = paired_bootstrap(labels, uids, a, b, n_resamples=500)["auc"]
    by_row = paired_bootstrap(labels, np.arange(len(labels)), a, b, n_resamples=500)["auc"]
    assert by_user.difference == by_row.difference
    assert by_user.high - by_user.low > 2 * (by_row.high - by_row.low)  # 2.45x at these seeds


def test_one_scorers_intervals_are_the_percentiles_of_its_metric_over_drawn_users():
    from ccfllm.metrics import bootstrap_intervals

    labels, uids, scores, _ = clustered_rows(n_users=12, rows_per_user=7)
    intervals = bootstrap_intervals(labels, uids, scores, n_resamples=400, seed=5)
    # the same draws by hand: users with replacement, every row of a drawn user weighted by its count
    draws = np.random.default_rng(5).integers(0, 12, size=(400, 12))
    counts = np.stack([np.bincount(d, minlength=12) for d in draws])
    aucs = [roc_auc_score(labels, scores, sample_weight=c[uids]) for c in counts]
    per_user = np.array([roc_auc_score(labels[uids == u], scores[uids == u]) for u in range(12)])
    uaucs = counts @ per_user / counts.sum(axis=1)
    np.testing.assert_allclose(intervals["auc"], np.percentile(aucs, [2.5, 97.5]), rtol=1e-12)
    np.testing.assert_allclose(intervals["uauc"], np.percentile(uaucs, [2.5, 97.5]), rtol=1e-12)
    assert intervals["auc"][0] < auc(labels, scores) < intervals["auc"][1]
