"""Read and write a split in CoLLM's format (the one the shipped ML-1M data uses), as Parquet.

A split folder holds `train.parquet`, `valid.parquet`, `test.parquet` with the columns below, and
optionally `items.parquet` (iid, title) and `meta.json`, which the raw converters write. Every check
raises one DataError that names the file, what is wrong, and what to do.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError
from ..io import atomic_path
from .dataset import PAD, SPLITS, CTRDataset, Split, pad_histories, warm_mask

REQUIRED_COLUMNS = ("uid", "iid", "label", "timestamp", "his", "title")
OPTIONAL_COLUMNS = ("his_title", "flag", "not_cold")
SPLIT_FLAGS = {"train": -1.0, "valid": 0.0, "test": 1.0}
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"


def load_collm_split(path: str | Path, max_history: int = 10, name: str | None = None) -> CTRDataset:
    """Load a CoLLM-format split folder into a CTRDataset, checking every column."""
    folder = Path(path)
    if max_history < 0:
        raise DataError(f"max_history must be >= 0, got {max_history}.")
    if not folder.is_dir():
        raise DataError(f"No dataset folder at {folder}.")
    frames = {split: _read_split_file(folder / f"{split}.parquet") for split in SPLITS}
    item_titles, known_items = _item_titles(folder, frames)
    meta = _read_meta(folder)

    splits = {}
    train_uid = frames["train"]["uid"].to_numpy()
    train_iid = frames["train"]["iid"].to_numpy()
    for split_name, frame in frames.items():
        histories = _histories(frame, folder / f"{split_name}.parquet", known_items)
        uid, iid = frame["uid"].to_numpy(np.int64), frame["iid"].to_numpy(np.int64)
        splits[split_name] = Split(
            name=split_name,
            uid=uid,
            iid=iid,
            label=frame["label"].to_numpy(np.int64),
            timestamp=frame["timestamp"].to_numpy(np.int64),
            history=pad_histories(histories, max_history),
            warm=warm_mask(uid, iid, train_uid, train_iid),
        )
    n_users = int(max(frame["uid"].max() for frame in frames.values())) + 1
    return CTRDataset(
        name=name or meta.get("name") or folder.name,
        n_users=max(n_users, int(meta.get("n_users", 0))),
        item_titles=item_titles,
        splits=splits,
        max_history=max_history,
        domain=meta.get("domain", "movies"),
        source=str(folder),
        extra=meta,
    )


def write_collm_split(
    folder: str | Path,
    frames: dict[str, pd.DataFrame],
    items: pd.DataFrame,
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Write a split folder atomically: either every file lands, or nothing does.

    `frames[split]` needs columns uid, iid, label, timestamp, his (liked history with the leading
    PAD, as CoLLM stores it), title; his_title, flag and not_cold are derived here.
    `items` has columns iid, title and includes the padding row iid 0 with an empty title.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise DataError(f"{folder} already exists; choose another output folder or pass --overwrite.")
    titles = dict(zip(items["iid"].tolist(), items["title"].tolist(), strict=True))
    train = frames["train"]
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for split, frame in frames.items():
            out = frame[["uid", "iid", "label", "timestamp", "his", "title"]].copy()
            out["his_title"] = [[titles[i] for i in his] for his in out["his"]]
            out["flag"] = SPLIT_FLAGS[split]
            out["not_cold"] = warm_mask(
                out["uid"].to_numpy(), out["iid"].to_numpy(), train["uid"].to_numpy(), train["iid"].to_numpy()
            ).astype(np.int64)
            out.to_parquet(tmp / f"{split}.parquet", index=False, compression="zstd")
        items[["iid", "title"]].to_parquet(tmp / ITEMS_FILE, index=False, compression="zstd")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def liked_histories(rows: pd.DataFrame) -> list[list[int]]:
    """For each row, the items its user liked in earlier rows, oldest first, behind a leading PAD.

    `rows` must hold one user's rows in time order per user (any interleaving of users); ties in
    time keep the given order. This is how CoLLM's `his` column was built, valid/test-period likes
    included: the shipped ML-1M split is reproduced exactly by it (tested).
    """
    liked_so_far: dict[int, list[int]] = {}
    histories = []
    for uid, iid, label in zip(
        rows["uid"].tolist(), rows["iid"].tolist(), rows["label"].tolist(), strict=True
    ):
        liked = liked_so_far.setdefault(uid, [])
        histories.append([PAD, *liked])
        if label == 1:
            liked.append(iid)
    return histories


# -- reading and checking -----------------------------------------------------------------------


def _read_split_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"Missing split file {path}: a dataset folder needs train.parquet, valid.parquet, test.parquet."
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Cannot read {path} as Parquet ({exc}); the file is corrupt or truncated.") from exc
    _check_columns(table.column_names, path)
    frame = table.to_pandas()
    if frame.empty:
        raise DataError(f"{path} has no rows; every split needs at least one.")
    _check_list_columns(table, path)
    for column in ("uid", "iid", "label", "timestamp"):
        if frame[column].isna().any() or not pd.api.types.is_integer_dtype(frame[column]):
            raise DataError(f"Column '{column}' of {path} must hold integers without missing values.")
    bad_labels = sorted(set(frame["label"].unique().tolist()) - {0, 1})
    if bad_labels:
        raise DataError(
            f"Column 'label' of {path} must be 0 or 1; found {bad_labels[:5]}. Binarise ratings first."
        )
    if (frame["uid"] <= PAD).any() or (frame["iid"] <= PAD).any():
        raise DataError(f"{path}: uid and iid must be >= 1 (0 is the padding id).")
    return frame


def _check_columns(columns: list[str], path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    extra = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        hints = {c: difflib.get_close_matches(c, REQUIRED_COLUMNS + OPTIONAL_COLUMNS, n=1) for c in extra}
        named = [f"'{c}' (did you mean '{h[0]}'?)" if h else f"'{c}'" for c, h in hints.items()]
        problems.append("unexpected " + ", ".join(named))
    raise DataError(
        f"{path} has the wrong columns: {'; '.join(problems)}. Expected {list(REQUIRED_COLUMNS)} "
        f"and optionally {list(OPTIONAL_COLUMNS)}."
    )


# The list columns: each row's liked history, and (optionally) the titles of those items, one per id.
LIST_COLUMNS = {
    "his": (pa.types.is_integer, "item ids"),
    "his_title": (lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind), "titles"),
}


def _check_list_columns(table: pa.Table, path: Path) -> None:
    """Every list column a list of the right kind of value, and his_title as long as his on each row
    (a title per history item): checked here, before anything pairs them up."""
    for name, (is_kind, holding) in LIST_COLUMNS.items():
        if name not in table.column_names:
            continue
        kind = table.schema.field(name).type
        lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        # an all-empty column of lists has no value type to check
        if not lists or not (is_kind(kind.value_type) or pa.types.is_null(kind.value_type)):
            raise DataError(f"Column '{name}' of {path} must hold lists of {holding}, not {kind}.")
    if "his_title" not in table.column_names:
        return
    his, titles = (_list_lengths(table[name]) for name in ("his", "his_title"))
    differ = np.flatnonzero((his >= 0) & (his != titles))  # a missing his (-1) gets its own error later
    if len(differ):
        row = int(differ[0])
        given = "no list" if titles[row] < 0 else f"{titles[row]} titles"
        raise DataError(
            f"{path}, row {row}: 'his' holds {his[row]} item ids but 'his_title' {given} ({len(differ)} "
            "rows disagree); his_title needs one title per history item."
        )


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Each row's list length; -1 where the row has no list."""
    return pc.fill_null(pc.list_value_length(column), -1).to_numpy().astype(np.int64)


def _item_titles(folder: Path, frames: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Title per item id, and which ids are known items: from items.parquet when present, else
    gathered from the title and his_title columns."""
    items_path = folder / ITEMS_FILE
    if items_path.exists():
        try:
            items = pq.read_table(items_path).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"Cannot read {items_path} as Parquet ({exc}); the file is corrupt or truncated."
            ) from exc
        if list(items.columns) != ["iid", "title"]:
            raise DataError(
                f"{items_path} must have exactly the columns ['iid', 'title'], not {list(items.columns)}."
            )
        pairs = zip(items["iid"].tolist(), items["title"].tolist(), strict=True)
    else:
        pairs = _title_pairs(frames)
    titles: dict[int, str] = {PAD: ""}
    for iid, title in pairs:
        if iid == PAD:
            continue
        title = "" if title is None or title is pd.NA else str(title)
        if titles.setdefault(iid, title) != title:
            raise DataError(f"Item {iid} in {folder} has two titles: {titles[iid]!r} and {title!r}.")
    unknown = sorted(
        {int(i) for frame in frames.values() for i in np.unique(frame["iid"].to_numpy())} - set(titles)
    )
    if unknown:
        raise DataError(
            f"Items {unknown[:5]} of {folder} have no title in {ITEMS_FILE}; every item needs one."
        )
    table = np.full(max(titles) + 1, "", dtype=object)
    known = np.zeros(max(titles) + 1, dtype=bool)
    for iid, title in titles.items():
        table[iid] = title
        known[iid] = iid != PAD
    return table, known


def _title_pairs(frames: dict[str, pd.DataFrame]):
    for frame in frames.values():
        yield from zip(frame["iid"].tolist(), frame["title"].tolist(), strict=True)
        if "his_title" in frame:
            for his, his_title in zip(frame["his"], frame["his_title"], strict=True):
                yield from zip(his.tolist(), his_title.tolist(), strict=True)


def _histories(frame: pd.DataFrame, path: Path, known_items: np.ndarray) -> list[list[int]]:
    """The liked histories without CoLLM's leading PAD, checked against the item table."""
    histories = []
    for row, his in enumerate(frame["his"]):
        if his is None:
            raise DataError(f"{path}, row {row}: 'his' is missing; use [0] for an empty history.")
        ids = [int(i) for i in his]
        if ids and ids[0] == PAD:
            ids = ids[1:]
        unknown = [i for i in ids if not 0 <= i < len(known_items) or not known_items[i]]
        if unknown:
            raise DataError(
                f"{path}, row {row}: the history names item {unknown[0]}, which is not a known item "
                "(no row or items table gives it a title). Check the item ids or the items table."
            )
        histories.append(ids)
    return histories


def _read_meta(folder: Path) -> dict:
    meta_path = folder / META_FILE
    if not meta_path.exists():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc}).") from exc
