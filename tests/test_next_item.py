"""A-LLMRec's next-item task: the leave-last-out rows, the candidate sampler (no leakage of the answer
or of rated items), the item groups, bad input, and the ranking metrics on hand-made numbers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ccfllm.data.dataset import PAD
from ccfllm.data.next_item import next_item_task, training_positions
from ccfllm.errors import DataError
from ccfllm.metrics import hit_at_k, ndcg_at_k, target_ranks


def liked_in_order(dataset, uid):
    rows = [
        (t, s, r) for s, split in enumerate(dataset.splits.values()) for r, t in enumerate(split.timestamp)
    ]
    parts = list(dataset.splits.values())
    ordered = sorted((t, s, r) for t, s, r in rows if parts[s].uid[r] == uid)
    items = []
    for _, s, r in ordered:
        if parts[s].label[r] == 1 and parts[s].iid[r] not in items:
            items.append(int(parts[s].iid[r]))
    return items


def test_rows_leave_the_last_two_liked_items_out(tiny_dataset):
    task = next_item_task(tiny_dataset, n_candidates=5, seed=0, max_history=50)
    for name, back in (("train", 3), ("valid", 2), ("test", 1)):
        split = task.splits[name]
        for row in range(0, len(split), 7):
            liked = liked_in_order(tiny_dataset, int(split.uid[row]))
            assert split.target[row] == liked[-back]
            history = split.history[row][split.history[row] != PAD].tolist()
            assert history == liked[: len(liked) - back][-50:]
    assert (
        task.sequences[int(task.splits["test"].uid[0])].tolist()
        == liked_in_order(tiny_dataset, int(task.splits["test"].uid[0]))[:-2]
    )


def test_more_training_positions_walk_back_the_sequence_and_never_reach_valid_or_test(tiny_dataset):
    task = next_item_task(tiny_dataset, n_candidates=5, seed=0, max_history=50)
    train = task.splits["train"]
    one = training_positions(task, 1)
    for field in ("uid", "history", "target"):
        assert np.array_equal(getattr(one, field), getattr(train, field))
    three, every = training_positions(task, 3), training_positions(task, 0)
    lengths = [len(task.sequences[u]) for u in train.uid.tolist()]
    assert len(three) == sum(min(3, n - 1) for n in lengths)
    assert len(every) == sum(n - 1 for n in lengths)
    user = int(train.uid[0])
    sequence = task.sequences[user].tolist()
    rows = np.flatnonzero(every.uid == user)
    assert every.target[rows].tolist() == sequence[1:][::-1]  # most recent first
    assert every.history[rows[-1]][every.history[rows[-1]] != PAD].tolist() == sequence[:1]
    held_out = {
        (int(u), int(t))
        for name in ("valid", "test")
        for u, t in zip(task.splits[name].uid, task.splits[name].target, strict=True)
    }
    assert not held_out & set(zip(every.uid.tolist(), every.target.tolist(), strict=True))
    with pytest.raises(DataError, match="per_user must be 0"):
        training_positions(task, -1)
    short = dataclasses.replace(task, sequences={**task.sequences, user: np.array(sequence[:1])})
    for per_user in (0, 1, 3):  # a one-item sequence keeps its one row, with an empty history
        rows = training_positions(short, per_user)
        mine = np.flatnonzero(rows.uid == user)
        assert rows.target[mine].tolist() == sequence[:1] and (rows.history[mine] == PAD).all()


def test_candidates_hold_the_answer_once_and_nothing_the_user_rated(tiny_dataset):
    task = next_item_task(tiny_dataset, n_candidates=5, seed=3)
    rated = {}
    for split in tiny_dataset.splits.values():
        for u, i in zip(split.uid, split.iid, strict=True):
            rated.setdefault(int(u), set()).add(int(i))
    for name in ("valid", "test"):
        split = task.splits[name]
        assert split.candidates.shape == (len(split), 5)
        assert ((split.candidates == split.target[:, None]).sum(axis=1) == 1).all()
        assert (split.candidates[np.arange(len(split)), split.answer] == split.target).all()
        for row in range(len(split)):
            others = set(split.candidates[row].tolist()) - {int(split.target[row])}
            assert len(others) == 4 and not others & rated[int(split.uid[row])] and PAD not in others
        # the answer's position is spread, not always last
        assert len(set(split.answer.tolist())) > 2
    again = next_item_task(tiny_dataset, n_candidates=5, seed=3)
    np.testing.assert_array_equal(again.splits["test"].candidates, task.splits["test"].candidates)


def test_items_split_into_cold_and_warm_by_training_interactions(tiny_dataset):
    task = next_item_task(tiny_dataset, n_candidates=5)
    groups = task.item_popularity_group(0.35)
    titled = np.flatnonzero([isinstance(t, str) and t != "" for t in tiny_dataset.item_titles])
    assert (groups[titled] == -1).sum() == (groups[titled] == 1).sum() == int(len(titled) * 0.35)
    assert task.item_counts[groups == -1].max() <= task.item_counts[groups == 1].min()


def test_bad_input_gets_one_clear_error(tiny_dataset):
    with pytest.raises(DataError, match="n_candidates must be at least 2"):
        next_item_task(tiny_dataset, n_candidates=1)
    with pytest.raises(DataError, match="titled items are left that the user never rated"):
        next_item_task(tiny_dataset, n_candidates=39)
    untitled = tiny_dataset.item_titles.copy()
    task = next_item_task(tiny_dataset, n_candidates=5)
    untitled[task.splits["test"].target[0]] = ""
    broken = type(tiny_dataset)(**{**tiny_dataset.__dict__, "item_titles": untitled})
    with pytest.raises(DataError, match="has no title; A-LLMRec names candidates by title"):
        next_item_task(broken, n_candidates=5)


def test_ranking_metrics_on_hand_made_scores():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.3, 0.3]])
    ranks = target_ranks(scores, np.array([0, 0, 1]))
    assert ranks.tolist() == [0, 1, 2]  # a tie counts against the answer
    assert hit_at_k(ranks, 1) == pytest.approx(1 / 3) and hit_at_k(ranks, 2) == pytest.approx(2 / 3)
    assert ndcg_at_k(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 3)


def cyclic_dataset(n_users=60, n_items=30, length=10, seed=0):
    """Users who like runs of consecutive items (k, k+1, ...): the next item is the last one plus one."""
    from ccfllm.data.dataset import CTRDataset, Split

    rng = np.random.default_rng(seed)
    uid, iid, stamp = [], [], []
    for user in range(1, n_users + 1):
        start = rng.integers(1, n_items)
        for step in range(length):
            uid.append(user)
            iid.append((start - 1 + step) % (n_items - 1) + 1)
            stamp.append(1000 * user + step)
    n = len(uid)
    split = Split(
        "train",
        np.array(uid),
        np.array(iid),
        np.ones(n, dtype=np.int64),
        np.array(stamp),
        np.zeros((n, 1), dtype=np.int64),
        np.ones(n, dtype=bool),
    )
    titles = np.array([""] + [f"Movie {i}" for i in range(1, n_items)], dtype=object)
    empty = split.take(np.array([], dtype=np.int64))
    splits = {"train": split, "valid": empty, "test": empty}
    return CTRDataset("cyclic", n_users + 1, titles, splits, max_history=1)


def test_sasrec_learns_the_next_item():
    from ccfllm.cf.next_item import next_item_metrics, rank_candidates, train_next_item_sasrec
    from ccfllm.config import cf_config

    task = next_item_task(cyclic_dataset(), n_candidates=10, seed=0, max_history=10)
    config = cf_config(
        "sasrec", dim=32, lr=1e-2, weight_decay=0.0, max_epochs=30, patience=30, max_history=10, device="cpu"
    )
    result = train_next_item_sasrec(config, task, progress=False)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"] / 2
    metrics = next_item_metrics(rank_candidates(result.model, task.splits["test"]))
    assert metrics["hit@1"] > 0.9, metrics  # chance is 0.1


def test_a_candidate_set_with_the_answer_twice_or_missing_is_refused():
    from ccfllm.data.next_item import NextItemSplit

    history = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(DataError, match="row 1 \\(user 8\\): its answer 5 appears 2 times"):
        NextItemSplit("test", np.array([7, 8]), history, np.array([4, 5]), np.array([[4, 1, 2], [5, 5, 2]]))
    with pytest.raises(DataError, match="its answer 4 appears 0 times"):
        NextItemSplit("test", np.array([7, 8]), history, np.array([4, 5]), np.array([[3, 1, 2], [5, 1, 2]]))


def test_cold_users_are_kept_out_of_training_and_asked_after_three_items(tiny_dataset):
    task = next_item_task(tiny_dataset, n_candidates=5, seed=0, cold_user_share=0.25)
    cold = task.splits["cold_users"]
    assert len(cold) == int(len([u for u in task.sequences] + cold.uid.tolist()) * 0.25)
    assert not set(cold.uid.tolist()) & set(task.sequences)  # in no training sequence
    for name in ("train", "valid", "test"):
        assert not set(cold.uid.tolist()) & set(task.splits[name].uid.tolist())
    for row in range(len(cold)):
        liked = liked_in_order(tiny_dataset, int(cold.uid[row]))
        assert cold.history[row][cold.history[row] != PAD].tolist() == liked[:3]
        assert cold.target[row] == liked[3]
    with pytest.raises(DataError, match="cold_user_share must be in"):
        next_item_task(tiny_dataset, cold_user_share=1.0)
