"""Build a CoLLM-format split from raw MovieLens-1M or Amazon review files, as CoLLM's notebooks do.

Followed: `dataset/ml-1m/processing_ood.ipynb` and `dataset/amazon_book/processing_ood.ipynb` of
zyang1580/CoLLM. Both notebooks end the same way, and so do both converters: the three splits are
concatenated, sorted by (uid, timestamp), and each row's `his` is the items the user liked in earlier
rows (`liked_histories`), so test rows see likes from the valid period; `not_cold` marks rows whose
user and item both appear in train. No cold-start filtering is applied (the notebooks comment it out).

MovieLens-1M:
- ratings.dat is inner-joined with movies.dat on the movie id: ratings of unknown movies are dropped.
- Month index m = calendar months (UTC) since the month of the earliest joined rating. Train is
  m = 14..23, valid 24..28, test 29..33, the notebook's fixed slots; other months are dropped. On ML-1M
  (2000-04 .. 2003-02) that is 2001-06..2002-03 / 2002-04..2002-08 / 2002-09..2003-01: the last 20
  complete months before the final month (2003-02, m = 34), which is not used.
- label = rating >= 4. No user or item filtering.
- Users are numbered 1.. in ascending raw id; items 1.. in order of first appearance in the rows sorted
  by (user, time) over all three splits.
- Ratings of one user in the same second are ordered as the notebook's pandas merge left them: by the
  movie's first appearance in ratings.dat, then by line. This tie order fixes both `his` and the item
  ids. The shipped split's same-second pairs (16,809) all agree with one such movie order.

Amazon Books (`Books_5` reviews + `meta_Books`):
- Metadata rows whose title contains 'getTime' (unformatted pages) are dropped; for a repeated asin
  the last row wins; a missing title becomes "" and the item is kept. Reviews of asins without
  metadata are dropped (the notebook's right join + dropna).
- Only reviews of 2017 (UTC) are used. Users and items with more than 20 of these reviews are kept,
  in one pass: both counts are taken before either filter, and not recomputed after.
- label = overall >= 5. Ids are numbered 1.. in order of first appearance in the joined rows, which
  follow the metadata file (position of each asin's kept row), then the review file.
- January..November is train. December is sorted by time and halved: the first len // 2 rows are
  valid, the rest test. The notebook's sort is not stable, so its order among reviews with the same
  timestamp is unknown; here such ties keep the joined order, which also orders same-time rows of one
  user. Repeated reviews of the same item are kept, as in the notebook.
"""

from __future__ import annotations

import ast
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import check_writable
from .collm import liked_histories, write_collm_split
from .dataset import PAD, SPLITS

ML_SPLIT_MONTHS = {"train": range(14, 24), "valid": range(24, 29), "test": range(29, 34)}
ML_LIKED_RATING = 4
ML_HINT = "Download ml-1m.zip from https://grouplens.org/datasets/movielens/1m/ and pass its unzipped folder."
ML_RATINGS_LAYOUT = "UserID::MovieID::Rating::Timestamp"
ML_MOVIES_LAYOUT = "MovieID::Title::Genres"

AMAZON_YEAR = 2017
AMAZON_MIN_RATINGS = 20  # kept users and items have more than this many reviews in the year
AMAZON_LIKED_RATING = 5
AMAZON_TRAIN_MONTHS = range(1, 12)
AMAZON_REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")
AMAZON_HINT = (
    "Use the 2018 Amazon review data (e.g. Books_5.json.gz and meta_Books.json.gz): one JSON object, "
    "or one Python dict literal, per line."
)
UNFORMATTED_TITLE_MARK = "getTime"

ML_PROTOCOL = (
    "CoLLM ml-1m processing_ood: months 14-23 / 24-28 / 29-33 after the first rating's month "
    "(train 10, valid 5, test 5); label = rating >= 4; his = earlier liked items over all splits."
)
AMAZON_PROTOCOL = (
    f"CoLLM amazon_book processing_ood: reviews of {AMAZON_YEAR} with metadata; users and items with more "
    f"than {AMAZON_MIN_RATINGS} reviews (one pass); Jan-Nov train, December sorted by time and halved "
    "into valid/test; label = rating 5; his = earlier liked items over all splits."
)


def convert_movielens(raw_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write CoLLM's ML-1M split built from `raw_dir`/ratings.dat and movies.dat into `out_dir`."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_output(out_dir, overwrite)
    ratings_path = _require_file(raw_dir / "ratings.dat", ML_HINT)
    movies_path = _require_file(raw_dir / "movies.dat", ML_HINT)
    ratings = _read_movielens_ratings(ratings_path)
    titles = _read_movielens_titles(movies_path)
    rows = _movielens_rows(ratings, titles, ratings_path)
    frames, items = _assemble(rows)
    meta = _meta("ml-1m-collm", "movies", ML_PROTOCOL, [ratings_path, movies_path], frames, items)
    meta["months"] = _movielens_month_spans(rows)
    return write_collm_split(out_dir, frames, items, meta, overwrite=overwrite)


def convert_amazon(
    reviews_path: str | Path, meta_path: str | Path, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write CoLLM's Amazon-Book split built from a review file and a metadata file (.json or .json.gz)."""
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    reviews_path = _require_file(Path(reviews_path), AMAZON_HINT)
    meta_path = _require_file(Path(meta_path), AMAZON_HINT)
    reviews = _read_amazon_reviews(reviews_path)
    titles = _read_amazon_titles(meta_path, wanted=set(reviews["asin"]))
    rows = _amazon_rows(reviews, titles, reviews_path, meta_path)
    frames, items = _assemble(rows)
    meta = _meta("amazon-book-collm", "books", AMAZON_PROTOCOL, [reviews_path, meta_path], frames, items)
    return write_collm_split(out_dir, frames, items, meta, overwrite=overwrite)


# -- MovieLens --------------------------------------------------------------------------------------


def _read_movielens_ratings(path: Path) -> pd.DataFrame:
    """Columns raw_user, raw_item, rating, timestamp, line (1-based), in file order."""
    fields, lines = _read_dat(path, ["user", "item", "rating", "timestamp"], ML_RATINGS_LAYOUT)
    return pd.DataFrame(
        {
            "raw_user": _integers(fields["user"], lines, path, "UserID"),
            "raw_item": _integers(fields["item"], lines, path, "MovieID"),
            "rating": _numbers(fields["rating"], lines, path, "Rating"),
            "timestamp": _integers(fields["timestamp"], lines, path, "Timestamp"),
            "line": lines,
        }
    )


def _read_movielens_titles(path: Path) -> pd.Series:
    """Title per raw movie id."""
    fields, lines = _read_dat(path, ["item", "title", "genres"], ML_MOVIES_LAYOUT, encoding="latin-1")
    ids = _integers(fields["item"], lines, path, "MovieID")
    repeated = pd.Series(ids).duplicated().to_numpy()
    if repeated.any():
        at = int(np.argmax(repeated))
        raise DataError(
            f"{path}, line {lines[at]}: movie {ids[at]} is listed twice; each MovieID must be unique."
        )
    return pd.Series(fields["title"].to_numpy(), index=ids)


def _movielens_rows(ratings: pd.DataFrame, titles: pd.Series, ratings_path: Path) -> pd.DataFrame:
    """The windowed ratings in the notebook's order, with dense ids, label, title and split."""
    # Rank of each movie's first appearance in ratings.dat: the notebook's merge grouped rows by it.
    item_rank = pd.factorize(ratings["raw_item"])[0]
    rows = ratings.assign(item_rank=item_rank)[ratings["raw_item"].isin(titles.index)]
    if rows.empty:
        raise DataError(
            f"No rating in {ratings_path} names a movie of movies.dat; check that both come from ML-1M."
        )
    rows = rows.assign(month=_months_since_first(rows["timestamp"], ratings_path))
    rows = rows.assign(split=_split_of_month(rows["month"]))
    window = rows[rows["split"] != ""]
    for split, months in ML_SPLIT_MONTHS.items():
        if not (window["split"] == split).any():
            raise DataError(
                f"No rating of {ratings_path} falls in the {split} months ({months.start}..{months.stop - 1} "
                "months after the first rating's month); the file does not cover CoLLM's window. "
                "Use the complete ratings.dat of ML-1M."
            )
    window = window.sort_values(["raw_user", "timestamp", "item_rank", "line"], kind="stable")
    return pd.DataFrame(
        {
            "uid": pd.factorize(window["raw_user"])[0] + 1,
            "iid": pd.factorize(window["raw_item"])[0] + 1,
            "label": (window["rating"] >= ML_LIKED_RATING).astype(np.int64).to_numpy(),
            "timestamp": window["timestamp"].to_numpy(),
            "title": window["raw_item"].map(titles).to_numpy(),
            "split": window["split"].to_numpy(),
            "month": window["month"].to_numpy(),
            "tie": np.arange(len(window)),
        }
    )


def _months_since_first(timestamps: pd.Series, path: Path) -> np.ndarray:
    try:
        dates = pd.to_datetime(timestamps, unit="s")
    except (OverflowError, ValueError) as exc:
        raise DataError(
            f"{path} holds a timestamp that is not a valid unix time in seconds ({exc})."
        ) from exc
    months = dates.dt.year.to_numpy(np.int64) * 12 + dates.dt.month.to_numpy(np.int64)
    return months - months.min()


def _split_of_month(month: pd.Series) -> np.ndarray:
    split = np.full(len(month), "", dtype=object)
    for name, months in ML_SPLIT_MONTHS.items():
        split[month.isin(months).to_numpy()] = name
    return split


def _movielens_month_spans(rows: pd.DataFrame) -> dict:
    spans = {}
    for split in SPLITS:
        stamps = rows.loc[rows["split"] == split, "timestamp"]
        first, last = (pd.to_datetime(stamps.agg(f), unit="s").strftime("%Y-%m") for f in ("min", "max"))
        spans[split] = [first, last]
    return spans


# -- Amazon -----------------------------------------------------------------------------------------


def _read_amazon_reviews(path: Path) -> pd.DataFrame:
    """The reviews of AMAZON_YEAR: columns user, asin, rating, timestamp, line; every line is checked."""
    start, end = _year_bounds(AMAZON_YEAR)
    kept = []
    for number, record in _records(path):
        review = _review(record, path, number)
        if start <= review[3] < end:
            kept.append((*review, number))
    return pd.DataFrame(kept, columns=["user", "asin", "rating", "timestamp", "line"])


def _review(record: dict, path: Path, number: int) -> tuple[str, str, float, int]:
    missing = [name for name in AMAZON_REVIEW_FIELDS if record.get(name) is None]
    if missing:
        raise DataError(
            f"{path}, line {number}: the review has no {', '.join(missing)}. Each review needs "
            f"{', '.join(AMAZON_REVIEW_FIELDS)}. {AMAZON_HINT}"
        )
    user, asin, rating, timestamp = (record[name] for name in AMAZON_REVIEW_FIELDS)
    if not isinstance(user, str) or not isinstance(asin, str):
        raise DataError(
            f"{path}, line {number}: reviewerID and asin must be strings, got {user!r} and {asin!r}."
        )
    rating = _number(rating, path, number, "overall")
    timestamp = _number(timestamp, path, number, "unixReviewTime")
    if timestamp != int(timestamp):
        raise DataError(f"{path}, line {number}: unixReviewTime must be whole seconds, got {timestamp!r}.")
    return user, asin, rating, int(timestamp)


def _number(value, path: Path, number: int, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        parsed = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}, line {number}: '{name}' must be a number, got {value!r}.") from None
    if not np.isfinite(parsed):
        raise DataError(f"{path}, line {number}: '{name}' must be a finite number, got {value!r}.")
    return parsed


def _read_amazon_titles(path: Path, wanted: set[str]) -> pd.DataFrame:
    """Title and metadata position of each wanted asin: the last row without an unformatted title."""
    kept: dict[str, tuple[str, int]] = {}
    for position, (number, record) in enumerate(_records(path)):
        asin, title = record.get("asin"), record.get("title")
        if not isinstance(asin, str):
            raise DataError(f"{path}, line {number}: the metadata row has no string 'asin'. {AMAZON_HINT}")
        title = "" if title is None else title
        if not isinstance(title, str):
            raise DataError(f"{path}, line {number}: 'title' must be a string, got {type(title).__name__}.")
        if asin in wanted and UNFORMATTED_TITLE_MARK not in title:
            kept[asin] = (title, position)
    return pd.DataFrame.from_dict(kept, orient="index", columns=["title", "position"])


def _amazon_rows(
    reviews: pd.DataFrame, titles: pd.DataFrame, reviews_path: Path, meta_path: Path
) -> pd.DataFrame:
    """The filtered reviews with dense ids, label, title and split."""
    joined = reviews[reviews["asin"].isin(titles.index)]
    joined = joined.assign(meta_position=joined["asin"].map(titles["position"]))
    joined = joined.sort_values(["meta_position", "line"], kind="stable")
    user_counts = joined["user"].map(joined["user"].value_counts())
    item_counts = joined["asin"].map(joined["asin"].value_counts())
    kept = joined[(user_counts > AMAZON_MIN_RATINGS) & (item_counts > AMAZON_MIN_RATINGS)]
    if kept.empty:
        raise DataError(
            f"No review is left after filtering: {len(reviews)} reviews of {AMAZON_YEAR} in {reviews_path}, "
            f"{len(joined)} of them with metadata in {meta_path}, none by a user and of an item that both "
            f"have more than {AMAZON_MIN_RATINGS}. Use the full Books_5 and meta_Books files."
        )
    rows = pd.DataFrame(
        {
            "uid": pd.factorize(kept["user"])[0] + 1,
            "iid": pd.factorize(kept["asin"])[0] + 1,
            "label": (kept["rating"] >= AMAZON_LIKED_RATING).astype(np.int64).to_numpy(),
            "timestamp": kept["timestamp"].to_numpy(np.int64),
            "title": kept["asin"].map(titles["title"]).to_numpy(),
            "tie": np.arange(len(kept)),
        }
    )
    rows["split"] = _amazon_splits(rows, reviews_path)
    return rows


def _amazon_splits(rows: pd.DataFrame, reviews_path: Path) -> np.ndarray:
    """Jan..Nov train; December in time order (ties in joined order), first half valid, rest test."""
    months = pd.to_datetime(rows["timestamp"], unit="s").dt.month.to_numpy()
    split = np.full(len(rows), "train", dtype=object)
    december = np.flatnonzero(~np.isin(months, AMAZON_TRAIN_MONTHS))
    december = december[np.argsort(rows["timestamp"].to_numpy()[december], kind="stable")]
    half = len(december) // 2
    split[december[:half]] = "valid"
    split[december[half:]] = "test"
    if half == 0 or len(december) == len(rows):
        raise DataError(
            f"After filtering, {reviews_path} has {len(rows) - len(december)} training reviews (Jan-Nov "
            f"{AMAZON_YEAR}) and {len(december)} in December; CoLLM's split needs training reviews and at "
            "least two December reviews. Use the full Books_5 file."
        )
    return split


def _year_bounds(year: int) -> tuple[int, int]:
    start = pd.Timestamp(year=year, month=1, day=1, tz="UTC")
    end = pd.Timestamp(year=year + 1, month=1, day=1, tz="UTC")
    return int(start.timestamp()), int(end.timestamp())


# -- shared -----------------------------------------------------------------------------------------


def _assemble(rows: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Split frames with CoLLM's `his`, and the item table, from rows with uid, iid, label, timestamp,
    title, split and a `tie` order for rows of one user at the same time."""
    rows = rows.sort_values(["uid", "timestamp", "tie"], kind="stable").reset_index(drop=True)
    rows["his"] = liked_histories(rows)
    return split_frames(rows)


def split_frames(rows: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Each split's rows in CoLLM's columns, and the item table (iid, title; the padding item first),
    from rows that carry their `split` and `his` already."""
    columns = ["uid", "iid", "label", "timestamp", "his", "title"]
    frames = {split: rows.loc[rows["split"] == split, columns].reset_index(drop=True) for split in SPLITS}
    titles = rows.drop_duplicates("iid").sort_values("iid")
    items = pd.concat(
        [pd.DataFrame({"iid": [PAD], "title": [""]}), titles[["iid", "title"]]], ignore_index=True
    ).astype({"iid": np.int64})
    return frames, items


def _meta(
    name: str, domain: str, protocol: str, sources: list[Path], frames: dict, items: pd.DataFrame
) -> dict:
    users = set().union(*(frame["uid"].tolist() for frame in frames.values()))
    return {
        "name": name,
        "domain": domain,
        "protocol": protocol,
        "sources": [path.name for path in sources],
        "users": len(users),
        "items": len(items) - 1,
        "n_users": len(users) + 1,  # ids including the padding id 0, as CTRDataset counts them
        "n_items": len(items),
        "rows": {split: len(frame) for split, frame in frames.items()},
        "positive_rate": {split: round(float(frame["label"].mean()), 6) for split, frame in frames.items()},
    }


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Fail before any reading if the output cannot be written."""
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} already exists; choose another output folder or pass --overwrite.")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another output path.")
    check_writable(out_dir)


def _require_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"Missing input file {path}. {hint}")
    return path


def _read_dat(
    path: Path, names: list[str], layout: str, encoding: str = "latin-1"
) -> tuple[pd.DataFrame, np.ndarray]:
    """The `::`-separated fields of each non-blank line as strings, and each row's 1-based line number."""
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path} ({exc}).") from exc
    # Split on newlines only: str.splitlines would also break titles at latin-1 control characters.
    lines = pd.Series(text.split("\n")).str.rstrip("\r")
    lines = lines[lines.str.strip() != ""]
    if lines.empty:
        raise DataError(f"{path} is empty; expected lines of the form {layout}.")
    fields = lines.str.split("::", regex=False)
    counts = fields.str.len().to_numpy()
    wrong = np.flatnonzero(counts != len(names))
    if len(wrong):
        at = wrong[0]
        raise DataError(
            f"{path}, line {lines.index[at] + 1}: expected {len(names)} fields separated by '::' ({layout}), "
            f"found {counts[at]}: {lines.iloc[at][:80]!r}. Is this the ML-1M file of that name?"
        )
    return pd.DataFrame(fields.tolist(), columns=names), lines.index.to_numpy() + 1


def _numbers(values: pd.Series, lines: np.ndarray, path: Path, name: str) -> np.ndarray:
    parsed = pd.to_numeric(values.str.strip(), errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(parsed))
    if len(bad):
        at = bad[0]
        raise DataError(f"{path}, line {lines[at]}: {name} must be a number, got {values.iloc[at]!r}.")
    return parsed


def _integers(values: pd.Series, lines: np.ndarray, path: Path, name: str) -> np.ndarray:
    parsed = _numbers(values, lines, path, name)
    bad = np.flatnonzero(parsed != np.round(parsed))
    if len(bad):
        at = bad[0]
        raise DataError(f"{path}, line {lines[at]}: {name} must be a whole number, got {values.iloc[at]!r}.")
    return parsed.astype(np.int64)


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON-lines file, gzipped or not."""
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, _parse_record(line, path, number)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise DataError(
            f"Cannot read {path} ({exc}); the file is corrupt, truncated or not UTF-8 text."
        ) from exc


def _open_text(path: Path):
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _parse_record(line: str, path: Path, number: int) -> dict:
    """One JSON object, or one Python dict literal as in the older Amazon dumps (never eval'd)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as json_error:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise DataError(
                f"{path}, line {number}: neither JSON ({json_error.msg}, column {json_error.colno}) nor a "
                f"Python dict literal. {AMAZON_HINT}"
            ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected one object per line, got {type(record).__name__}.")
    return record
