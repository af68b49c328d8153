"""The one in-memory CTR dataset that every model reads.

Ids are dense integers: users 1..n_users-1 and items 1..n_items-1, with 0 reserved for padding,
exactly as in the CoLLM split. A row is (uid, iid, label, timestamp, history), where `history` holds
the ids of the items the user liked before the row, most recent last, capped to `max_history` and
left-padded with 0 so that a batch of rows is one (N, H) matrix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import CheckpointError

SPLITS = ("train", "valid", "test")
PAD = 0


@dataclass(frozen=True)
class Split:
    """One split's rows as aligned arrays (N rows, history width H)."""

    name: str
    uid: np.ndarray  # (N,) int64
    iid: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64 in {0, 1}
    timestamp: np.ndarray  # (N,) int64 unix seconds
    history: np.ndarray  # (N, H) int64, most recent liked item last, left-padded with PAD
    warm: np.ndarray  # (N,) bool: user and item both appear in the train split (CoLLM's not_cold)

    def __len__(self) -> int:
        return len(self.uid)

    def take(self, rows: np.ndarray) -> Split:
        """The split restricted to `rows` (indices), in that order."""
        return Split(
            self.name,
            *(getattr(self, f)[rows] for f in ("uid", "iid", "label", "timestamp", "history", "warm")),
        )

    @property
    def history_length(self) -> np.ndarray:
        return (self.history != PAD).sum(axis=1)

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame, history as lists (without padding)."""
        return pd.DataFrame(
            {
                "uid": self.uid,
                "iid": self.iid,
                "label": self.label,
                "timestamp": self.timestamp,
                "history": [row[row != PAD].tolist() for row in self.history],
                "warm": self.warm,
            }
        )


@dataclass(frozen=True)
class CTRDataset:
    """Users, items with titles, and the train/valid/test rows."""

    name: str
    n_users: int  # number of user ids including the padding id 0
    item_titles: np.ndarray  # (n_items,) object: title of each item id; "" for the padding id
    splits: dict[str, Split]
    max_history: int
    domain: str = "movies"  # which prompt template fits the items: "movies" or "books"
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_titles)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def valid(self) -> Split:
        return self.splits["valid"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def fingerprint(self) -> dict:
        """What a checkpoint records to recognise the dataset it was trained on (same_dataset)."""
        return {
            "dataset": self.name,
            "n_users": int(self.n_users),
            "n_items": int(self.n_items),
            "rows": {name: len(split) for name, split in self.splits.items()},
            "content": self.content_hash(),
        }

    def content_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of every split's rows and the item titles: the same for a copy
        of the data under any folder or name. Histories are left out: they follow from the rows."""
        digest = hashlib.sha256()
        for name, split in sorted(self.splits.items()):
            digest.update(name.encode())
            for column in (split.uid, split.iid, split.label, split.timestamp):
                digest.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
        titles = (t if isinstance(t, str) else "" for t in self.item_titles)
        digest.update("\x1f".join(titles).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> pd.DataFrame:
        """Counts per split: rows, users, items, label balance, cold items and users."""
        train = self.train
        train_users, train_items = set(train.uid.tolist()), set(train.iid.tolist())
        records = []
        for name, split in self.splits.items():
            records.append(
                {
                    "split": name,
                    "rows": len(split),
                    "users": len(np.unique(split.uid)),
                    "items": len(np.unique(split.iid)),
                    "positive_rate": float(split.label.mean()),
                    "cold_item_rows": int((~np.isin(split.iid, list(train_items))).sum()),
                    "cold_user_rows": int((~np.isin(split.uid, list(train_users))).sum()),
                    "warm_rows": int(split.warm.sum()),
                    "mean_history": float(split.history_length.mean()),
                    "first": pd.to_datetime(split.timestamp.min(), unit="s").date().isoformat(),
                    "last": pd.to_datetime(split.timestamp.max(), unit="s").date().isoformat(),
                }
            )
        return pd.DataFrame.from_records(records).set_index("split")


def pad_histories(histories: list[list[int]], max_history: int) -> np.ndarray:
    """Keep the `max_history` most recent ids of each history; left-pad with PAD. -> (N, max_history)"""
    matrix = np.full((len(histories), max_history), PAD, dtype=np.int64)
    for row, history in enumerate(histories):
        recent = history[-max_history:] if max_history > 0 else []
        if recent:
            matrix[row, max_history - len(recent) :] = recent
    return matrix


def warm_mask(uid: np.ndarray, iid: np.ndarray, train_uid: np.ndarray, train_iid: np.ndarray) -> np.ndarray:
    """CoLLM's `not_cold`: the row's user and item both appear in the train split."""
    return np.isin(uid, train_uid) & np.isin(iid, train_iid)


def without_latest_train_rows(dataset: CTRDataset, share: float) -> tuple[CTRDataset, Split]:
    """The dataset with only the earliest (1 - share) of its train rows, and the latest `share` of them
    (by timestamp): rows a backbone trained on the first did not see, the way it does not see test rows."""
    if not 0 < share < 1:
        raise ValueError(f"share must be between 0 and 1, got {share}")
    order = np.argsort(dataset.train.timestamp, kind="stable")
    cut = int(round((1 - share) * len(order)))
    earliest, latest = (dataset.train.take(np.sort(part)) for part in (order[:cut], order[cut:]))
    return replace(dataset, splits={**dataset.splits, "train": earliest}), latest


def same_dataset(recorded: dict | str | None, given: dict) -> bool:
    """Whether the fingerprint a checkpoint or results file recorded names the dataset given. By content
    where the record holds its hash, whatever the dataset's name (a copy elsewhere is the same data);
    records written before contents were hashed compare by name and counts, as they did then, and a
    record that is a name alone (A-LLMRec runs of that time) by name."""
    if isinstance(recorded, str):
        return recorded == given["dataset"]
    if not isinstance(recorded, dict):
        return False
    if "content" in recorded:
        return _without(recorded, "dataset") == _without(given, "dataset")
    return recorded == _without(given, "content")


def refuse_other_dataset(source, recorded: dict | str | None, dataset: CTRDataset) -> None:
    """One clear error where what `source` (a saved run or checkpoint) recorded is not `dataset`."""
    if not same_dataset(recorded, dataset.fingerprint()):
        raise CheckpointError(
            f"{source} was trained on {recorded}, not on the dataset given ({dataset.fingerprint()}): "
            "point --data at the data it was trained on, or train it again on this one."
        )


def _without(fingerprint: dict, key: str) -> dict:
    return {k: v for k, v in fingerprint.items() if k != key}
