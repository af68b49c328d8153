"""Your own data: a CoLLM-format split folder from a generic interactions file and an items file.

interactions (CSV, TSV or Parquet): `user`, `item`, `timestamp` (unix seconds, or a date/time pandas
reads), and `rating` (a number; label = rating >= the label threshold) or `label` (0 or 1).
items: `item`, `title`. Users and items are any strings or numbers; they are numbered 1.. here (0 is the
padding id): users in order of first appearance in time order, items likewise. Rows of items the items
file does not list, or lists without a title, are dropped (a prompt names every item by its title),
and meta.json counts them.

Splits, by time, as CoLLM's are: `fractions` cuts the rows sorted by time at the (1 - valid - test)
and (1 - test) quantiles; `time` cuts at two given moments (rows before `valid_from` train, before
`test_from` valid, the rest test). Each row's `his` is the items its user liked in earlier rows, at most
`history_length` of the most recent, behind CoLLM's leading PAD (`collm.liked_histories`). The domain
word decides the prompt's nouns ("movies" / "movie", "books" / "book"; prompt.TEMPLATES).
docs/dataset-format.md describes the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .collm import liked_histories, write_collm_split
from .dataset import PAD, SPLITS
from .raw import split_frames


@dataclass(frozen=True)
class SplitRule:
    """How rows are split by time: 'fractions' (valid and test shares of the rows, latest last) or
    'time' (the moments valid and test start)."""

    kind: str = "fractions"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    valid_from: str | None = None
    test_from: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fractions", "time"):
            raise DataError(f"split must be 'fractions' or 'time', not {self.kind!r}.")
        if self.kind == "fractions":
            shares = (self.valid_fraction, self.test_fraction)
            if min(shares) <= 0 or sum(shares) >= 1:
                raise DataError(
                    f"valid and test fractions must be > 0 and sum below 1, got {shares[0]} and {shares[1]}."
                )
        elif not (self.valid_from and self.test_from):
            raise DataError("A 'time' split needs both --valid-from and --test-from.")


def convert_interactions(
    interactions: str | Path,
    items: str | Path,
    out_dir: str | Path,
    split: SplitRule | None = None,
    label_threshold: float = 4.0,
    history_length: int = 10,
    domain: str = "movies",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the split folder `out_dir` (atomically) and return it."""
    from ..prompt import TEMPLATES

    split = split or SplitRule()
    out_dir = Path(out_dir)
    if domain not in TEMPLATES:
        raise DataError(f"No prompt wording for domain {domain!r}; choose one of {sorted(TEMPLATES)}.")
    if history_length < 1:
        raise DataError(f"history_length must be at least 1, got {history_length}.")
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} already exists; choose another output folder or pass --overwrite.")
    rows = _read_interactions(Path(interactions), label_threshold)
    titles = _read_items(Path(items))
    rows, dropped = _titled_rows(rows, titles, Path(interactions))
    rows = _numbered(rows)
    rows["split"] = _split_by_time(rows["timestamp"], split)
    frames, item_table = _frames(rows, history_length)
    meta = {
        "name": name or out_dir.name,
        "domain": domain,
        "protocol": "convert-interactions",
        "sources": [Path(interactions).name, Path(items).name],
        "split": vars(split),
        "label_threshold": label_threshold,
        "history_length": history_length,
        "dropped_rows_without_title": dropped,
        "users": int(rows["uid"].nunique()),
        "items": len(item_table) - 1,
        "n_users": int(rows["uid"].max()) + 1,
        "n_items": len(item_table),
        "rows": {s: len(f) for s, f in frames.items()},
        "positive_rate": {s: round(float(f["label"].mean()), 6) for s, f in frames.items()},
        "user_ids": rows.drop_duplicates("uid").set_index("uid")["user"].astype(str).to_dict(),
        "item_ids": rows.drop_duplicates("iid").set_index("iid")["item"].astype(str).to_dict(),
    }
    meta["user_ids"] = {str(k): v for k, v in sorted(meta["user_ids"].items())}
    meta["item_ids"] = {str(k): v for k, v in sorted(meta["item_ids"].items())}
    return write_collm_split(out_dir, frames, item_table, meta, overwrite=overwrite)


def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"Missing {what} file {path}.")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    try:
        if suffix.startswith(".parquet"):
            return pd.read_parquet(path)
        separator = "\t" if suffix.startswith(".tsv") else ","
        return pd.read_csv(path, sep=separator, dtype={"user": str, "item": str})
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {path} ({what}): {exc}") from exc


def _read_interactions(path: Path, label_threshold: float) -> pd.DataFrame:
    frame = _read_table(path, "interactions")
    missing = [c for c in ("user", "item", "timestamp") if c not in frame.columns]
    if missing or not ({"rating", "label"} & set(frame.columns)):
        raise DataError(
            f"{path} needs columns user, item, timestamp and rating or label; it has {list(frame.columns)}."
        )
    if frame.empty:
        raise DataError(f"{path} has no rows.")
    for column in ("user", "item"):
        if frame[column].isna().any():
            raise DataError(
                f"Column '{column}' of {path} has missing values (row {_first_gap(frame[column])})."
            )
    rows = pd.DataFrame({"user": frame["user"].astype(str), "item": frame["item"].astype(str)})
    rows["timestamp"] = _unix_seconds(frame["timestamp"], path)
    rows["label"] = _labels(frame, label_threshold, path)
    rows["line"] = np.arange(len(frame))  # the file's order breaks ties in time
    return rows


def _labels(frame: pd.DataFrame, threshold: float, path: Path) -> np.ndarray:
    if "label" in frame.columns:
        labels = pd.to_numeric(frame["label"], errors="coerce")
        if labels.isna().any() or not labels.isin([0, 1]).all():
            raise DataError(f"Column 'label' of {path} must hold 0 or 1 on every row.")
        return labels.to_numpy(np.int64)
    ratings = pd.to_numeric(frame["rating"], errors="coerce")
    if ratings.isna().any():
        raise DataError(f"Column 'rating' of {path} must hold numbers (row {_first_gap(ratings)} does not).")
    return (ratings >= threshold).to_numpy(np.int64)


def _unix_seconds(values: pd.Series, path: Path) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(np.int64)
    moments = pd.to_datetime(values, errors="coerce", utc=True)
    if moments.isna().any():
        raise DataError(
            f"Column 'timestamp' of {path} must hold unix seconds or dates "
            f"(row {_first_gap(moments)} does not)."
        )
    # whole seconds since 1970, whatever resolution pandas parsed the dates in
    return ((moments - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def _first_gap(values: pd.Series) -> int:
    return int(np.flatnonzero(values.isna().to_numpy())[0])


def _read_items(path: Path) -> pd.Series:
    frame = _read_table(path, "items")
    if not {"item", "title"} <= set(frame.columns):
        raise DataError(f"{path} needs columns item and title; it has {list(frame.columns)}.")
    titles = frame["title"].fillna("").astype(str).str.strip()
    keyed = pd.Series(titles.to_numpy(), index=frame["item"].astype(str))
    return keyed[~keyed.index.duplicated(keep="last")]  # a repeated item: its last title


def _titled_rows(rows: pd.DataFrame, titles: pd.Series, path: Path) -> tuple[pd.DataFrame, int]:
    rows = rows.assign(title=rows["item"].map(titles).fillna(""))
    kept = rows[rows["title"] != ""]
    if kept.empty:
        raise DataError(f"No row of {path} is of an item with a title in the items file.")
    return kept.reset_index(drop=True), len(rows) - len(kept)


def _numbered(rows: pd.DataFrame) -> pd.DataFrame:
    """uid and iid from 1, in order of first appearance in time order (ties: the file's order)."""
    rows = rows.sort_values(["timestamp", "line"], kind="stable").reset_index(drop=True)
    rows["uid"] = pd.factorize(rows["user"])[0] + 1
    rows["iid"] = pd.factorize(rows["item"])[0] + 1
    return rows


def _split_by_time(timestamps: pd.Series, rule: SplitRule) -> np.ndarray:
    if rule.kind == "fractions":
        ordered = np.sort(timestamps.to_numpy())
        valid_from = ordered[int(len(ordered) * (1 - rule.valid_fraction - rule.test_fraction))]
        test_from = ordered[min(int(len(ordered) * (1 - rule.test_fraction)), len(ordered) - 1)]
    else:
        valid_from, test_from = (_moment(text) for text in (rule.valid_from, rule.test_from))
    if test_from < valid_from:
        raise DataError("The test period must start after the valid period.")
    stamps = timestamps.to_numpy()
    split = np.select([stamps < valid_from, stamps < test_from], ["train", "valid"], "test")
    empty = [name for name in SPLITS if not (split == name).any()]
    if empty:
        raise DataError(
            f"The split rule leaves {empty} without rows (rows with equal timestamps stay together); "
            "choose other fractions or moments."
        )
    return split


def _moment(text: str) -> int:
    """A moment given as unix seconds or a date (UTC)."""
    if str(text).lstrip("-").isdigit():
        return int(text)
    try:
        return int(pd.Timestamp(text, tz="UTC").timestamp())
    except ValueError as exc:
        raise DataError(f"{text!r} is neither unix seconds nor a date.") from exc


def _frames(rows: pd.DataFrame, history_length: int) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    rows = rows.sort_values(["uid", "timestamp", "line"], kind="stable").reset_index(drop=True)
    rows["his"] = [[PAD, *his[1:][-history_length:]] for his in liked_histories(rows)]
    return split_frames(rows)
