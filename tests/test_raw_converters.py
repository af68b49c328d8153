"""Raw MovieLens-1M / Amazon files -> CoLLM-format split, following CoLLM's processing notebooks."""

from __future__ import annotations

import calendar
import gzip
import json
from graphlib import TopologicalSorter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ccfllm.data.collm import liked_histories, load_collm_split
from ccfllm.data.raw import convert_amazon, convert_movielens
from ccfllm.errors import DataError

SHIPPED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-1m-collm"
SPLIT_NAMES = ("train", "valid", "test")


# -- helpers ----------------------------------------------------------------------------------------


def unix(year: int, month: int, day: int = 1, hour: int = 0, second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, 0, second))


def end_of_month(year: int, month: int) -> int:
    """The last second of the month."""
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((next_year, next_month, 1, 0, 0, 0)) - 1


def write_movielens(folder: Path, ratings: list[tuple], movies: dict[int, str]) -> Path:
    """ratings.dat (user, movie, rating, time) and latin-1 movies.dat, in ML-1M's `::` format."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join("::".join(map(str, r)) + "\n" for r in ratings))
    lines = "".join(f"{iid}::{title}::Drama\n" for iid, title in movies.items())
    (folder / "movies.dat").write_bytes(lines.encode("latin-1"))
    return folder


def write_json_lines(path: Path, records: list[dict], python_literals: bool = False) -> Path:
    text = "".join((repr(r) if python_literals else json.dumps(r)) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def split_rows(dataset, split: str) -> list[tuple]:
    """(uid, iid, label, history) per row of a loaded split."""
    frame = dataset.splits[split].frame()
    return list(zip(frame.uid, frame.iid, frame.label, frame.history, strict=True))


# -- MovieLens --------------------------------------------------------------------------------------

MOVIES = {
    900: "Anchor (2000)",
    10: "Amélie (2001)",
    20: "Heat (1995)",
    30: "Alien (1979)",
    40: "Fargo (1996)",
}


def movielens_window_ratings() -> list[tuple]:
    """Raw ratings around CoLLM's window: months 14-23 train, 24-28 valid, 29-33 after April 2000."""
    return [
        (7, 555, 5, unix(1999, 12, 5)),  # unknown movie: dropped, and must not anchor the months
        (50, 900, 4, unix(2000, 4, 15)),  # month 0: anchors the window, then dropped
        (7, 10, 5, end_of_month(2001, 5)),  # month 13: dropped
        (7, 20, 4, unix(2001, 6, 1)),  # month 14: train
        (7, 30, 3, end_of_month(2002, 3)),  # month 23: train
        (3, 10, 5, unix(2002, 1, 10)),
        (7, 10, 4, unix(2002, 4, 1)),  # month 24: valid
        (9, 40, 2, end_of_month(2002, 8)),  # month 28: valid
        (7, 40, 5, unix(2002, 9, 1)),  # month 29: test
        (3, 30, 1, end_of_month(2003, 1)),  # month 33: test
        (7, 30, 5, unix(2003, 2, 1)),  # month 34: dropped
    ]


def test_movielens_window_labels_ids_and_histories(tmp_path):
    raw = write_movielens(tmp_path / "raw", movielens_window_ratings(), MOVIES)
    out = convert_movielens(raw, tmp_path / "out")
    dataset = load_collm_split(out, max_history=10)

    # Users 3, 7, 9 -> 1, 2, 3 (ascending raw id); movies 10, 30, 20, 40 -> 1..4 (first appearance in
    # the rows sorted by user and time). Label = rating >= 4. Histories are earlier likes of any split.
    assert split_rows(dataset, "train") == [(1, 1, 1, []), (2, 3, 1, []), (2, 2, 0, [3])]
    assert split_rows(dataset, "valid") == [(2, 1, 1, [3]), (3, 4, 0, [])]
    assert split_rows(dataset, "test") == [(1, 2, 0, [1]), (2, 4, 1, [3, 1])]  # [3, 1]: train + valid likes
    assert dataset.item_titles.tolist() == [
        "",
        "Amélie (2001)",
        "Alien (1979)",
        "Heat (1995)",
        "Fargo (1996)",
    ]
    assert dataset.valid.warm.tolist() == [True, False]
    assert dataset.test.warm.tolist() == [True, False]
    assert (dataset.n_users, dataset.n_items, dataset.domain) == (4, 5, "movies")
    assert dataset.extra["months"] == {
        "train": ["2001-06", "2002-03"],
        "valid": ["2002-04", "2002-08"],
        "test": ["2002-09", "2003-01"],
    }
    assert dataset.extra["rows"] == {"train": 3, "valid": 2, "test": 2}


def test_movielens_ratings_in_one_second_keep_the_notebooks_merge_order(tmp_path):
    # The notebook's merge grouped ratings by movie, in order of each movie's first line in ratings.dat:
    # movie 20 comes first, so user 1's same-second rating of 20 precedes that of 10.
    same_second = unix(2001, 7, 1, 12)
    ratings = [
        (50, 900, 4, unix(2000, 4, 15)),
        (2, 20, 5, unix(2001, 7, 1)),
        (1, 10, 5, same_second),
        (1, 20, 5, same_second),
        (2, 10, 5, unix(2002, 5, 1)),
        (2, 30, 5, unix(2002, 10, 1)),
    ]
    out = convert_movielens(write_movielens(tmp_path / "raw", ratings, MOVIES), tmp_path / "out")
    dataset = load_collm_split(out)
    heat, amelie = 1, 2  # first appearances in the sorted rows: user 1's movie 20, then its movie 10
    assert split_rows(dataset, "train") == [(1, heat, 1, []), (1, amelie, 1, [heat]), (2, heat, 1, [])]
    assert split_rows(dataset, "test") == [(2, 3, 1, [heat, amelie])]


@pytest.mark.parametrize(
    "ratings_text, movies_text, message",
    [
        ("1::10::5::978300760\n1::20::4\n", None, r"ratings\.dat, line 2: expected 4 fields"),
        ("1::10::5::978300760\n\n1::20::five::978300760\n", None, r"line 3: Rating must be a number"),
        ("1::10::5::978300760.5\n", None, r"line 1: Timestamp must be a whole number"),
        (
            "1::10::5::978300760\n",
            "10::Heat (1995)::Drama\n20|Alien|Drama\n",
            r"movies\.dat, line 2: expected 3 fields",
        ),
        ("1::10::5::978300760\n", "10::Heat::Drama\n10::Heat::Drama\n", r"movie 10 is listed twice"),
        ("1::99::5::978300760\n", None, r"No rating .* names a movie of movies\.dat"),
        ("1::10::5::978300760\n", None, r"No rating .* falls in the train months"),
    ],
)
def test_movielens_bad_input_raises_one_data_error_and_writes_nothing(
    tmp_path, ratings_text, movies_text, message
):
    raw = write_movielens(tmp_path / "raw", [], MOVIES)
    (raw / "ratings.dat").write_text(ratings_text)
    if movies_text is not None:
        (raw / "movies.dat").write_text(movies_text)
    with pytest.raises(DataError, match=message):
        convert_movielens(raw, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_movielens_missing_file_and_existing_output(tmp_path):
    raw = write_movielens(tmp_path / "raw", movielens_window_ratings(), MOVIES)
    (raw / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"Missing input file .*movies\.dat.*grouplens"):
        convert_movielens(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    write_movielens(raw, movielens_window_ratings(), MOVIES)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        convert_movielens(raw, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    convert_movielens(raw, existing, overwrite=True)
    assert sorted(p.name for p in existing.iterdir()) == [
        "items.parquet",
        "meta.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]


# -- Amazon -----------------------------------------------------------------------------------------

MAIN_USERS = [f"M{u}" for u in range(22)]
CORE_ITEMS = [f"I{i}" for i in range(22)]  # I20, I21 are rated in December only


def amazon_reviews() -> list[dict]:
    """Reviews, one user after another, exercising every filter of the notebook."""
    reviews = []

    def review(user, asin, timestamp, overall=5.0):
        reviews.append({"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": timestamp})

    for u, user in enumerate(MAIN_USERS):
        for i, asin in enumerate(CORE_ITEMS[:20]):
            review(user, asin, unix(2017, 1 + (u + i) % 11, 10, i), 5.0 if (u + i) % 3 else 4.0)
        for i in (20, 21):
            review(user, CORE_ITEMS[i], unix(2017, 12, 1 + u, i - 20), 5.0 if (u + i) % 3 else 4.0)
        review(user, "NOTITLE", unix(2017, 4, 2))
        if u < 21:
            review(user, "D21", unix(2017, 3, 2))  # 21 reviews: kept
        if u < 20:
            review(user, "D20", unix(2017, 3, 3))  # 20 reviews: dropped
        review(user, "GETTIME", unix(2017, 3, 4))  # unformatted metadata: dropped
    review("M0", "I0", unix(2017, 12, 31), 3.0)  # a repeat in December: 45 December reviews
    review("M0", "I0", unix(2018, 1, 1))  # not 2017
    for i, asin in enumerate(CORE_ITEMS[:20]):
        review("KEEP21", asin, unix(2017, 5, 1, i))
        review("DROP20", asin, unix(2017, 5, 1, i))
        review("NOMETA", asin, unix(2017, 5, 1, i))
        review("OLD", asin, unix(2017, 5, 1, i))
    review("KEEP21", "LOW", unix(2017, 2, 1))  # 21 reviews, one of a dropped item: kept (one pass)
    review("NOMETA", "GHOST", unix(2017, 2, 1))  # GHOST has no metadata: NOMETA has only 20
    for i in range(5):
        review("OLD", CORE_ITEMS[i], unix(2016, 6, 1, i))  # other years do not count
    return reviews


def amazon_meta() -> list[dict]:
    """Metadata in an order unlike the reviews': ids follow it. I1's last row wins."""
    rows = [{"asin": "I1", "title": "Old title of I1"}]
    rows += [{"asin": a, "title": f"Book {a}", "price": ""} for a in reversed(CORE_ITEMS) if a != "I1"]
    rows += [
        {"asin": "NOTITLE", "category": []},
        {"asin": "D21", "title": "Book D21"},
        {"asin": "D20", "title": "Book D20"},
        {"asin": "GETTIME", "title": "var x = new Date().getTime();"},
        {"asin": "LOW", "title": "Book LOW"},
        {"asin": "I1", "title": "Book I1"},
    ]
    return rows


def write_amazon(folder: Path, gzipped: bool = False, python_literal_meta: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if gzipped else ".json"
    reviews = write_json_lines(folder / f"Books_5{suffix}", amazon_reviews())
    meta = write_json_lines(
        folder / f"meta_Books{suffix}", amazon_meta(), python_literals=python_literal_meta
    )
    return reviews, meta


def test_amazon_filters_ids_and_titles_follow_the_notebook(tmp_path):
    dataset = load_collm_split(convert_amazon(*write_amazon(tmp_path / "raw"), tmp_path / "out"))
    titles = dataset.item_titles.tolist()

    # Items numbered in metadata order of their kept rows: I21, I20, ..., I2, I0, NOTITLE, D21, I1.
    expected_titles = [f"Book I{i}" for i in range(21, 1, -1)] + ["Book I0", "", "Book D21", "Book I1"]
    assert titles == ["", *expected_titles]
    assert (dataset.domain, dataset.extra["name"], dataset.extra["users"], dataset.extra["items"]) == (
        "books",
        "amazon-book-collm",
        23,
        24,
    )
    # Main users first appear with I21, in file order; KEEP21 (21 reviews, 20 left) comes last.
    keep21 = 23
    rows = pd.concat([dataset.splits[s].frame() for s in SPLIT_NAMES])
    assert sorted(rows.uid.unique()) == list(range(1, 24))
    assert len(rows[rows.uid == keep21]) == 20
    assert dataset.extra["rows"] == {"train": 503, "valid": 22, "test": 23}
    assert dataset.train.label.tolist().count(0) > 0 and dataset.train.label.mean() > 0.5


def test_amazon_december_is_halved_in_time_order_with_labels_and_histories(tmp_path):
    dataset = load_collm_split(
        convert_amazon(*write_amazon(tmp_path / "raw"), tmp_path / "out"), max_history=100
    )
    valid, test = dataset.valid, dataset.test
    december = unix(2017, 12, 1)
    assert dataset.train.timestamp.max() < december <= valid.timestamp.min()
    assert valid.timestamp.max() <= test.timestamp.min()
    assert sorted(set(valid.uid.tolist())) == list(range(1, 12))  # M0..M10 reviewed on Dec 1..11
    assert sorted(set(test.uid.tolist())) == [1, *range(12, 23)]  # M11..M21, and M0's repeat on Dec 31

    # Labels: rating 5 only. M0 gave I20 a 5 and I21 a 4 on Dec 1 (valid), and I0 a 3 on Dec 31 (test).
    i21, i20, i0 = 1, 2, 21
    m0_valid = split_rows(dataset, "valid")[:2]
    assert [(iid, label) for _, iid, label, _ in m0_valid] == [(i20, 1), (i21, 0)]
    m0_test = [row for row in split_rows(dataset, "test") if row[0] == 1]
    assert [(iid, label) for _, iid, label, _ in m0_test] == [(i0, 0)]
    assert m0_test[0][3][-1] == i20  # the test row's history ends with the valid-period like
    assert m0_valid[1][3][-1] == i20  # ... which the same-time valid row after it sees too

    # Cold rows: I20 and I21 only occur in December.
    for split in (valid, test):
        assert split.warm.tolist() == [iid not in (i20, i21) for iid in split.iid.tolist()]


def test_amazon_accepts_gzip_and_python_literal_lines(tmp_path):
    plain = convert_amazon(*write_amazon(tmp_path / "plain"), tmp_path / "out_plain")
    packed = convert_amazon(
        *write_amazon(tmp_path / "packed", gzipped=True, python_literal_meta=True), tmp_path / "out_packed"
    )
    for name in (*[f"{s}.parquet" for s in SPLIT_NAMES], "items.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(plain / name), pd.read_parquet(packed / name))


@pytest.mark.parametrize(
    "broken_line, message",
    [
        ("{not json at all", r"Books_5\.json, line 3: neither JSON"),
        (
            '{"reviewerID": "A", "asin": "I0", "unixReviewTime": 1490000000}',
            r"line 3: the review has no overall",
        ),
        (
            '{"reviewerID": "A", "asin": "I0", "overall": "five", "unixReviewTime": 1}',
            r"line 3: 'overall' must be",
        ),
        ("[1, 2]", r"line 3: expected one object per line"),
    ],
)
def test_amazon_bad_review_line_raises_one_data_error_and_writes_nothing(tmp_path, broken_line, message):
    reviews, meta = write_amazon(tmp_path / "raw")
    lines = reviews.read_text().splitlines()
    lines.insert(2, broken_line)
    reviews.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        convert_amazon(reviews, meta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_amazon_missing_files_empty_result_and_existing_output(tmp_path):
    reviews, meta = write_amazon(tmp_path / "raw")
    with pytest.raises(DataError, match=r"Missing input file .*meta_Books\.json\.gz"):
        convert_amazon(reviews, tmp_path / "raw" / "meta_Books.json.gz", tmp_path / "out")

    only_2016 = [{**r, "unixReviewTime": unix(2016, 5, 5)} for r in amazon_reviews()]
    write_json_lines(reviews, only_2016)
    with pytest.raises(DataError, match=r"No review is left after filtering: 0 reviews of 2017"):
        convert_amazon(reviews, meta, tmp_path / "out")

    write_json_lines(meta, [{"title": "no asin"}])
    with pytest.raises(DataError, match=r"meta_Books\.json, line 1: the metadata row has no string 'asin'"):
        convert_amazon(reviews, meta, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists"):
        convert_amazon(reviews, meta, tmp_path / "out")


# -- the shipped ML-1M split ------------------------------------------------------------------------


def shipped_rows() -> pd.DataFrame:
    """All three shipped splits in file order, with a `split` column."""
    frames = [pd.read_parquet(SHIPPED / f"{s}.parquet").assign(split=s) for s in SPLIT_NAMES]
    return pd.concat(frames, ignore_index=True)


needs_shipped = pytest.mark.skipif(not SHIPPED.is_dir(), reason=f"shipped split not found at {SHIPPED}")


@pytest.mark.needs_data
@needs_shipped
def test_liked_histories_reproduce_the_shipped_his_column():
    rows = shipped_rows().sort_values(["uid", "timestamp"], kind="stable")
    rebuilt = liked_histories(rows)
    assert [list(h) for h in rows["his"]] == rebuilt


def item_order_of_ties(rows: pd.DataFrame) -> dict[int, int]:
    """A rank per item consistent with the order of every user's same-second ratings."""
    sorter = TopologicalSorter({iid: () for iid in rows["iid"].unique()})
    for _, tied in rows.groupby(["uid", "timestamp"], sort=False)["iid"]:
        items = tied.tolist()
        for earlier, later in zip(items, items[1:], strict=False):
            sorter.add(later, earlier)
    return {iid: rank for rank, iid in enumerate(sorter.static_order())}


def raw_movielens_from_shipped(rows: pd.DataFrame, folder: Path) -> Path:
    """ratings.dat/movies.dat that CoLLM's notebook turns into the shipped split, plus ratings it drops."""
    raw_user, raw_item = rows["uid"] * 3 + 100, 5000 - rows["iid"]
    # Lines grouped by item in an order that reproduces the shipped order of same-second ratings.
    position = rows["iid"].map(item_order_of_ties(rows)) * len(rows) + np.arange(len(rows))
    ratings = pd.DataFrame(
        {
            "user": raw_user,
            "item": raw_item,
            "rating": np.where(rows["label"] == 1, 5, 2),
            "time": rows["timestamp"],
        }
    ).iloc[np.argsort(position.to_numpy(), kind="stable")]
    outside = [
        (9, 4999, 5, unix(2001, 3, 3)),  # before the window
        (103, 4999, 5, unix(2003, 2, 3)),  # user 1, month 34: after the window
        (9, 7777, 5, unix(2000, 1, 1)),  # a movie missing from movies.dat: neither kept nor anchoring
    ]
    lines = [(8, 9999, 4, unix(2000, 4, 26)), *ratings.itertuples(index=False, name=None), *outside]
    titles = dict(zip(raw_item, rows["title"], strict=True)) | {9999: "Anchor (2000)"}
    return write_movielens(folder, lines, titles)


@pytest.mark.needs_data
@needs_shipped
def test_convert_movielens_reproduces_the_shipped_split(tmp_path):
    shipped = shipped_rows()
    out = convert_movielens(raw_movielens_from_shipped(shipped, tmp_path / "raw"), tmp_path / "out")
    for split in SPLIT_NAMES:
        expected = shipped[shipped["split"] == split].reset_index(drop=True)
        produced = pd.read_parquet(out / f"{split}.parquet")
        for column in ("uid", "iid", "label", "timestamp", "title", "flag", "not_cold"):
            assert produced[column].tolist() == expected[column].tolist(), (split, column)
        assert [list(h) for h in produced["his"]] == [list(h) for h in expected["his"]], split
        assert [list(h) for h in produced["his_title"]] == [list(h) for h in expected["his_title"]], split
