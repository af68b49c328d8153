"""The CoLLM-format loader: what it reads, and one clear DataError for each kind of bad input,
with the files on disk left exactly as they were."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ccfllm.data import PAD, load_collm_split, resolve_data_dir
from ccfllm.data.dataset import same_dataset
from ccfllm.errors import DataError
from conftest import one_label_flipped, renamed

SHIPPED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-1m-collm"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def copy_of_tiny(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def test_loads_rows_titles_and_capped_left_padded_histories(tiny_dataset, tiny_dir):
    train = tiny_dataset.train
    raw = pd.read_parquet(tiny_dir / "train.parquet")
    assert len(train) == len(raw) and tiny_dataset.n_users == 49 and tiny_dataset.n_items == 41
    assert tiny_dataset.item_titles[PAD] == "" and tiny_dataset.item_titles[7] == "Movie 7 (1987)"
    row = int(np.argmax([len(h) for h in raw["his"]]))  # the longest stored history
    stored = [i for i in raw["his"][row].tolist() if i != PAD]
    assert train.history.shape[1] == 5
    assert train.history[row].tolist() == stored[-5:]  # most recent 5, most recent last
    short = int(np.argmin([len(h) for h in raw["his"]]))
    assert (train.history[short] == PAD).all()  # CoLLM's [0] = no history: all padding
    assert train.warm.all()  # every train row is warm by definition


def test_missing_directory_says_where_it_looked_and_how_to_point_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("CCFLLM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere.*--data DIR or CCFLLM_DATA=DIR"):
        resolve_data_dir()
    assert resolve_data_dir(tmp_path) == tmp_path


def _rewrite(folder: Path, split: str, change) -> None:
    frame = pd.read_parquet(folder / f"{split}.parquet")
    change(frame).to_parquet(folder / f"{split}.parquet", index=False)


BAD_TABLES = {
    "missing column": (lambda f: f.drop(columns=["label"]), r"missing \['label'\]"),
    "misnamed column": (
        lambda f: f.rename(columns={"label": "lable"}),
        r"'lable' \(did you mean 'label'\?\)",
    ),
    "extra column": (lambda f: f.assign(rating=3), r"unexpected 'rating'"),
    "label outside 0/1": (lambda f: f.assign(label=f["label"] * 4), r"must be 0 or 1; found \[4\]"),
    "unknown history item": (
        lambda f: f.assign(
            his=[[0, 999]] + f["his"].tolist()[1:], his_title=[["", "?"]] + f["his_title"].tolist()[1:]
        ),
        r"row 0: the history names item 999, which is not a known item",
    ),
    "empty split": (lambda f: f.iloc[:0], r"has no rows"),
    "float ids": (lambda f: f.assign(uid=f["uid"] + 0.5), r"'uid' .* must hold integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_tables_raise_one_clear_error_and_change_nothing(copy_of_tiny, case):
    change, message = BAD_TABLES[case]
    _rewrite(copy_of_tiny, "valid", change)
    before = digest(copy_of_tiny)
    with pytest.raises(DataError, match=message):
        load_collm_split(copy_of_tiny)
    assert digest(copy_of_tiny) == before


def test_truncated_and_missing_files(copy_of_tiny):
    path = copy_of_tiny / "test.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_collm_split(copy_of_tiny)
    path.unlink()
    with pytest.raises(DataError, match="Missing split file .*test.parquet"):
        load_collm_split(copy_of_tiny)


def test_without_items_table_titles_come_from_the_rows(copy_of_tiny, tiny_dataset):
    (copy_of_tiny / "items.parquet").unlink()
    dataset = load_collm_split(copy_of_tiny, max_history=5)
    seen = np.unique(np.concatenate([s.iid for s in dataset.splits.values()]))
    assert (dataset.item_titles[seen] == tiny_dataset.item_titles[seen]).all()


needs_shipped = pytest.mark.skipif(not SHIPPED.is_dir(), reason=f"shipped split not found at {SHIPPED}")


@pytest.mark.needs_data
@needs_shipped
def test_shipped_movielens_split_counts_and_semantics():
    dataset = load_collm_split(SHIPPED)
    assert {name: len(s) for name, s in dataset.splits.items()} == {
        "train": 33891,
        "valid": 10401,
        "test": 7331,
    }
    assert (dataset.n_users, dataset.n_items) == (839, 3256)
    test = pd.read_parquet(SHIPPED / "test.parquet")
    # `not_cold` is "user and item both in train"; histories are the 10 most recent of `his`
    assert (dataset.test.warm == test["not_cold"].astype(bool).to_numpy()).all()
    expected = [[i for i in his.tolist() if i != PAD][-10:] for his in test["his"]]
    assert [row[row != PAD].tolist() for row in dataset.test.history] == expected


def test_a_dataset_is_recognised_by_its_rows_not_its_name_or_folder(tiny_dataset, tiny_dir, tmp_path):
    recorded = tiny_dataset.fingerprint()
    copy = load_collm_split(shutil.copytree(tiny_dir, tmp_path / "my-copy"), max_history=5, name="mine")
    assert copy.fingerprint()["dataset"] == "mine" and same_dataset(recorded, copy.fingerprint())
    assert same_dataset(recorded, renamed(tiny_dataset).fingerprint())
    flipped = one_label_flipped(tiny_dataset).fingerprint()
    assert flipped["rows"] == recorded["rows"] and not same_dataset(recorded, flipped)
    # a record from before contents were hashed: compared by name and counts, as it was then
    legacy = {key: value for key, value in recorded.items() if key != "content"}
    assert same_dataset(legacy, tiny_dataset.fingerprint())
    assert not same_dataset(legacy, renamed(tiny_dataset).fingerprint())
    assert same_dataset("tiny", recorded) and not same_dataset("other", recorded)  # a name alone
    assert not same_dataset(None, recorded)
