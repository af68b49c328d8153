"""`ccfllm data convert-interactions`: your own interactions and items files to a split folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from ccfllm.cli import main
from ccfllm.data import load_collm_split
from ccfllm.data.interactions import SplitRule, convert_interactions
from ccfllm.errors import DataError


def _files(tmp_path, rating_column="rating"):
    # 3 users, 4 titled items and one without a title; times 100..109
    interactions = pd.DataFrame(
        {
            "user": ["ann", "bob", "ann", "cid", "bob", "ann", "cid", "bob", "ann", "cid"],
            "item": ["b1", "b2", "b2", "b1", "b3", "b3", "b9", "b4", "b4", "b2"],
            rating_column: [5, 2, 4, 3, 5, 1, 5, 4, 5, 4] if rating_column == "rating" else [1, 0] * 5,
            "timestamp": list(range(100, 110)),
        }
    )
    items = pd.DataFrame(
        {"item": ["b1", "b2", "b3", "b4", "b9"], "title": ["One", "Two", "Three", "Four", ""]}
    )
    interactions.to_csv(tmp_path / "interactions.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    return tmp_path / "interactions.csv", tmp_path / "items.csv"


def test_a_converted_folder_loads_with_its_splits_labels_and_histories(tmp_path):
    interactions, items = _files(tmp_path)
    rule = SplitRule("fractions", valid_fraction=0.2, test_fraction=0.3)
    out = convert_interactions(interactions, items, tmp_path / "books", rule, label_threshold=4,
                               history_length=1, domain="books")  # fmt: skip
    dataset = load_collm_split(out, max_history=10)
    assert dataset.domain == "books" and dataset.name == "books"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dropped_rows_without_title"] == 1  # cid's b9 has no title
    assert meta["user_ids"] == {"1": "ann", "2": "bob", "3": "cid"}
    assert meta["item_ids"] == {"1": "b1", "2": "b2", "3": "b3", "4": "b4"}
    # 9 titled rows at times 100..105, 107..109: valid from the row at 0.5 (the 5th, t=104), test from
    # the row at 0.7 (the 7th, t=107)
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 4, "valid": 2, "test": 3}
    ann = pd.read_parquet(out / "test.parquet").query("uid == 1")
    # ann liked b1 (5), b2 (4), not b3 (1): her test row (b4 at 108) keeps the last like, behind PAD
    assert ann["his"].map(list).tolist() == [[0, 2]]
    assert ann["label"].tolist() == [1]
    assert dataset.item_titles.tolist() == ["", "One", "Two", "Three", "Four"]


def test_the_cli_converts_with_time_windows_and_a_label_column(tmp_path):
    interactions, items = _files(tmp_path, rating_column="label")
    files = [str(interactions), str(items), str(tmp_path / "out")]
    arguments = ["data", "convert-interactions", *files, "--split", "time", "--valid-from", "105",
                 "--test-from", "108"]  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    dataset = load_collm_split(tmp_path / "out")
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 5, "valid": 2, "test": 2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--domain", "songs"], "No prompt wording for domain 'songs'"),
        (["--split", "time", "--valid-from", "105"], "needs both --valid-from and --test-from"),
        (["--valid-fraction", "0.6", "--test-fraction", "0.5"], "sum below 1"),
        (["--split", "time", "--valid-from", "100", "--test-from", "101"], "without rows"),
        (["--history-length", "0"], "history_length must be at least 1"),
    ],
)
def test_bad_options_are_one_clear_error_and_write_nothing(tmp_path, options, message):
    interactions, items = _files(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["data", "convert-interactions", str(interactions), str(items), str(out), *options]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_a_file_without_the_columns_is_refused(tmp_path):
    (tmp_path / "bad.csv").write_text("who,what\n1,2\n")
    _, items = _files(tmp_path)
    with pytest.raises(DataError, match="needs columns user, item, timestamp and rating or label"):
        convert_interactions(tmp_path / "bad.csv", items, tmp_path / "out")
