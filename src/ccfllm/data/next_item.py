"""The next-item task of A-LLMRec (KDD 2024), built from any CTRDataset's interactions.

Per user, the liked items (label 1) of every split in time order form the sequence. As in SASRec and
A-LLMRec, the last one is the test target, the one before it the valid target, and the rest train; a
row's history is every liked item before its target, most recent last. Each valid and test row ranks a
candidate set: its target and `n_candidates - 1` items the user never interacted with (any label, any
split) and that have a title, drawn with a seed; the target sits at a random position, once.

Users with fewer than 3 liked items have no train item to learn from and are left out (their count is
kept in `dropped_users`). Cold and warm items are the bottom and top 35% by training interactions;
cold users (optional) are users held out of training, asked for their fourth liked item after three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .dataset import PAD, CTRDataset, pad_histories

MIN_LIKED = 3  # one to train on, one to validate, one to test
COLD_USER_HISTORY = 3  # A-LLMRec's cold users: three interactions, then the next item


@dataclass(frozen=True)
class NextItemSplit:
    """Rows of (user, history, target) and, for valid and test, the candidates each ranks."""

    name: str
    uid: np.ndarray  # (N,) int64
    history: np.ndarray  # (N, H) int64: liked items before the target, most recent last, PAD-left
    target: np.ndarray  # (N,) int64
    candidates: np.ndarray  # (N, C) int64; the target appears exactly once. (N, 0) for train

    def __post_init__(self) -> None:
        if self.candidates.shape[1] == 0:
            return
        counts = (self.candidates == self.target[:, None]).sum(axis=1)
        wrong = np.flatnonzero(counts != 1)
        if len(wrong):
            row = int(wrong[0])
            user, answer = int(self.uid[row]), int(self.target[row])
            raise DataError(
                f"{self.name} row {row} (user {user}): its answer {answer} appears {int(counts[row])} times "
                "among its candidates; a candidate set must hold it exactly once."
            )

    def __len__(self) -> int:
        return len(self.uid)

    @property
    def answer(self) -> np.ndarray:
        """The target's column in `candidates`. -> (N,)"""
        return (self.candidates == self.target[:, None]).argmax(axis=1)


@dataclass(frozen=True)
class NextItemTask:
    name: str
    item_titles: np.ndarray  # (n_items,) as in the CTR dataset
    sequences: dict[int, np.ndarray]  # uid -> liked items of the train part, in time order
    splits: dict[str, NextItemSplit]
    item_counts: np.ndarray  # (n_items,) training interactions (liked items of the train part)
    dropped_users: int

    @property
    def n_items(self) -> int:
        return len(self.item_titles)

    def item_popularity_group(self, share: float = 0.35) -> np.ndarray:
        """-1 cold (bottom `share` by training interactions), 1 warm (top `share`), 0 between; per item
        id. Ranked over the items that have a title."""
        titled = np.flatnonzero([isinstance(t, str) and t.strip() != "" for t in self.item_titles])
        order = titled[np.argsort(self.item_counts[titled], kind="stable")]
        groups = np.zeros(self.n_items, dtype=np.int64)
        cut = int(len(order) * share)
        groups[order[:cut]], groups[order[len(order) - cut :]] = -1, 1
        return groups


def next_item_task(
    dataset: CTRDataset,
    n_candidates: int = 20,
    seed: int = 0,
    max_history: int = 50,
    cold_user_share: float = 0.0,
) -> NextItemTask:
    """A-LLMRec's task from `dataset` (see the module docstring). With `cold_user_share`, that share of
    the users with at least COLD_USER_HISTORY + 1 liked items (seeded) is kept out of every training
    split; the "cold_users" split asks for their next item after their first COLD_USER_HISTORY."""
    if n_candidates < 2:
        raise DataError(f"n_candidates must be at least 2 (the target and one other), got {n_candidates}.")
    if not 0.0 <= cold_user_share < 1.0:
        raise DataError(f"cold_user_share must be in [0, 1), got {cold_user_share}.")
    liked, seen = _liked_sequences(dataset)
    titled = np.array([isinstance(t, str) and t.strip() != "" for t in dataset.item_titles])
    titled[PAD] = False
    users = [u for u, items in liked.items() if len(items) >= MIN_LIKED]
    if not users:
        raise DataError(
            f"No user of {dataset.name} has {MIN_LIKED} liked items; the next-item task needs them."
        )
    for uid in users:
        untitled = [i for i in liked[uid][-2:] if not titled[i]]
        if untitled:
            raise DataError(
                f"Item {untitled[0]} (a valid or test target of user {uid}) has no title; A-LLMRec names "
                "candidates by title. Add it to the items table."
            )
    rng = np.random.default_rng(seed)
    eligible = [u for u in users if len(liked[u]) > COLD_USER_HISTORY]
    cold = set(rng.choice(eligible, int(len(eligible) * cold_user_share), replace=False).tolist())
    users = [u for u in users if u not in cold]
    splits = {}
    for name, back in (("train", 3), ("valid", 2), ("test", 1)):
        rows = [
            (uid, liked[uid][: len(liked[uid]) - back], liked[uid][len(liked[uid]) - back]) for uid in users
        ]
        candidates = (
            np.zeros((len(rows), 0), dtype=np.int64)
            if name == "train"
            else np.stack(
                [sample_candidates(target, seen[uid], titled, n_candidates, rng) for uid, _, target in rows]
            )
        )
        splits[name] = NextItemSplit(
            name,
            uid=np.array([uid for uid, _, _ in rows], dtype=np.int64),
            history=pad_histories([list(history) for _, history, _ in rows], max_history),
            target=np.array([target for _, _, target in rows], dtype=np.int64),
            candidates=candidates,
        )
    if cold:
        rows = [(uid, liked[uid][:COLD_USER_HISTORY], liked[uid][COLD_USER_HISTORY]) for uid in sorted(cold)]
        splits["cold_users"] = NextItemSplit(
            "cold_users",
            uid=np.array([uid for uid, _, _ in rows], dtype=np.int64),
            history=pad_histories([list(history) for _, history, _ in rows], max_history),
            target=np.array([target for _, _, target in rows], dtype=np.int64),
            candidates=np.stack(
                [sample_candidates(target, seen[uid], titled, n_candidates, rng) for uid, _, target in rows]
            ),
        )
    sequences = {uid: np.asarray(liked[uid][:-2], dtype=np.int64) for uid in users}
    counts = np.bincount(np.concatenate(list(sequences.values())), minlength=dataset.n_items)
    dropped = len(liked) - len(users) - len(cold)
    return NextItemTask(dataset.name, dataset.item_titles, sequences, splits, counts, dropped)


def training_positions(task: NextItemTask, per_user: int = 1) -> NextItemSplit:
    """Train rows at the last `per_user` positions of each user's training sequence (0: every position
    after the first), most recent first per user: history = the items before the position, target = the
    item at it. A user whose sequence is one item long keeps that item's row, with an empty history, as
    in the task's own train split, which `per_user=1` reproduces (A-LLMRec's one row per user). The
    valid and test targets are never among them (the sequences end before them)."""
    if per_user < 0:
        raise DataError(f"per_user must be 0 (every position) or positive, got {per_user}.")
    train = task.splits["train"]
    rows = []
    for uid in train.uid.tolist():
        sequence = task.sequences[uid].tolist()
        last = len(sequence) - 1
        first = min(last, 1 if per_user == 0 else max(1, len(sequence) - per_user))
        rows += [(uid, sequence[:t], sequence[t]) for t in range(last, first - 1, -1)]
    return NextItemSplit(
        "train",
        uid=np.array([uid for uid, _, _ in rows], dtype=np.int64),
        history=pad_histories([history for _, history, _ in rows], train.history.shape[1]),
        target=np.array([target for _, _, target in rows], dtype=np.int64),
        candidates=np.zeros((len(rows), 0), dtype=np.int64),
    )


def _liked_sequences(dataset: CTRDataset) -> tuple[dict[int, list[int]], dict[int, set[int]]]:
    """uid -> liked items in time order (ties: split order, then row order); uid -> every item rated."""
    uid = np.concatenate([s.uid for s in dataset.splits.values()])
    iid = np.concatenate([s.iid for s in dataset.splits.values()])
    label = np.concatenate([s.label for s in dataset.splits.values()])
    time = np.concatenate([s.timestamp for s in dataset.splits.values()])
    order = np.lexsort((np.arange(len(uid)), time))
    liked: dict[int, list[int]] = {}
    seen: dict[int, set[int]] = {}
    for row in order:
        user, item = int(uid[row]), int(iid[row])
        seen.setdefault(user, set()).add(item)
        if label[row] == 1 and item not in liked.setdefault(user, []):
            liked[user].append(item)
    return liked, seen


def sample_candidates(
    target: int, seen: set[int], titled: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """The target and size - 1 titled items the user never rated, shuffled."""
    pool = np.flatnonzero(titled)
    pool = pool[~np.isin(pool, list(seen))]
    if len(pool) < size - 1:
        raise DataError(
            f"Only {len(pool)} titled items are left that the user never rated; "
            f"{size - 1} negatives are needed."
        )
    chosen = np.append(rng.choice(pool, size - 1, replace=False), target)
    return rng.permutation(chosen).astype(np.int64)


def titled_items(item_titles: np.ndarray) -> np.ndarray:
    """(n_items,) bool: which item ids have a title, as prompts show it (only those can be candidates)."""
    return np.array([i != PAD and isinstance(t, str) and bool(t.strip()) for i, t in enumerate(item_titles)])


def draw_candidates(
    task: NextItemTask,
    titled: np.ndarray,
    uids: np.ndarray,
    targets: np.ndarray,
    n_candidates: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A candidate set per training row: its target and titled items its user never liked. -> (B, C)"""
    seen = [set(task.sequences[int(u)].tolist()) for u in uids]
    return np.stack(
        [sample_candidates(int(t), s, titled, n_candidates, rng) for t, s in zip(targets, seen, strict=True)]
    )


def unliked_item(liked: set[int], n_items: int, rng: np.random.Generator) -> int:
    """An item id the user never liked, drawn uniformly (stage 1's negative)."""
    item = int(rng.integers(1, n_items))
    while item in liked:
        item = int(rng.integers(1, n_items))
    return item
