"""Metrics against values computed by hand."""

import numpy as np
import pytest

from ccfllm.metrics import auc, rela_impr, split_metrics, uauc


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
