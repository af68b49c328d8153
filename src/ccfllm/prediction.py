"""Scores of a loaded run for arbitrary (uid, iid) rows, with the cold-start policy of the guide:
users and items the backbone never saw have no CF signal, and a new item is scored from its title."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .data.dataset import PAD, CTRDataset, Split, pad_histories
from .engine import score_rows
from .errors import CCFLLMError
from .recommender import Recommender, make_prompts


def predict_rows(
    recommender: Recommender, dataset: CTRDataset, rows: pd.DataFrame, progress: bool = False
) -> pd.DataFrame:
    """Scores for arbitrary (uid, iid) rows, with the cold-start policy of the README.

    A row's history is its `history` column if given, else the user's most recent liked items in the
    dataset. A user or item that the CF backbone never saw in training has no CF embedding: its x^CF is
    a zero vector, so its positions carry no collaborative signal (the user token is ALG(0); each title
    token is fused with ALG(0), Eq. 4, which is the same for every such item), and the `cf` column says
    which side had one. A new item needs a `title` column.
    """
    frame = _checked_prediction_rows(rows, dataset)
    titles = _titles_with_new_items(dataset, frame)
    histories = _prediction_histories(dataset, frame, recommender.config.max_history)
    split = Split(
        name="predict",
        uid=frame["uid"].to_numpy(np.int64),
        iid=frame["iid"].to_numpy(np.int64),
        label=np.zeros(len(frame), dtype=np.int64),
        timestamp=np.zeros(len(frame), dtype=np.int64),
        history=histories,
        warm=np.zeros(len(frame), dtype=bool),
    )
    prompts = recommender.final_prompts()
    if len(titles) != len(dataset.item_titles):
        prompts = make_prompts(
            recommender.llm, titles, dataset.domain, recommender.config, prompts.layout, prompts.similar_items
        )
    batch_size = recommender.config.eval_batch_size
    scores = score_rows(recommender.model, prompts, split, None, batch_size, progress)
    features = recommender.model.cf
    if features is None:  # a text-only method reads no CF signal
        return pd.DataFrame({"uid": split.uid, "iid": split.iid, "score": scores, "cf": "none"})
    known_users = features.known_users.cpu().numpy()
    known_items = features.known_items.cpu().numpy()
    user_known = np.array([0 <= u < len(known_users) and known_users[u] for u in split.uid])
    item_known = np.array([0 <= i < len(known_items) and known_items[i] for i in split.iid])
    cf = np.select(
        [user_known & item_known, user_known, item_known], ["user+item", "user only", "item only"], "none"
    )
    return pd.DataFrame({"uid": split.uid, "iid": split.iid, "score": scores, "cf": cf})


def _checked_prediction_rows(rows: pd.DataFrame, dataset: CTRDataset) -> pd.DataFrame:
    missing = [c for c in ("uid", "iid") if c not in rows.columns]
    if missing:
        raise CCFLLMError(f"Rows to score need columns uid and iid; missing {missing}.")
    for column in ("uid", "iid"):
        if rows[column].isna().any() or not pd.api.types.is_integer_dtype(rows[column]):
            raise CCFLLMError(f"Column {column!r} of the rows to score must hold integers without gaps.")
    new_items = rows["iid"][(rows["iid"] <= PAD) | (rows["iid"] >= dataset.n_items)]
    if len(new_items) and "title" not in rows.columns:
        raise CCFLLMError(
            f"Items {sorted(set(new_items.tolist()))[:5]} are not in {dataset.name}: add a `title` column "
            "so that they can be scored from their text."
        )
    return rows.reset_index(drop=True)


def _titles_with_new_items(dataset: CTRDataset, frame: pd.DataFrame) -> np.ndarray:
    new = frame[frame["iid"] >= dataset.n_items]
    if new.empty:
        return dataset.item_titles
    titles = np.concatenate(
        [dataset.item_titles, np.full(int(new["iid"].max()) + 1 - dataset.n_items, "", object)]
    )
    titles[new["iid"].to_numpy()] = new["title"].astype(str).to_numpy()
    return titles


def _prediction_histories(dataset: CTRDataset, frame: pd.DataFrame, max_history: int) -> np.ndarray:
    if "history" in frame.columns:
        return pad_histories([[int(i) for i in h if i != PAD] for h in frame["history"]], max_history)
    latest: dict[int, list[int]] = {}
    for split in dataset.splits.values():  # the user's most recent liked items, over all splits
        for uid, iid, label, timestamp in zip(
            split.uid, split.iid, split.label, split.timestamp, strict=True
        ):
            if label == 1:
                latest.setdefault(int(uid), []).append((int(timestamp), int(iid)))
    liked = {uid: [iid for _, iid in sorted(pairs)] for uid, pairs in latest.items()}
    return pad_histories([liked.get(int(uid), []) for uid in frame["uid"]], max_history)
