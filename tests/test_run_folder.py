"""The one run-folder format (run_folder.py) and the one finished-part format (partial.save_part):
what a run records about itself, and folders of the formats before them still read."""

import json
import shutil

import pandas as pd
import pytest
import torch

import ccfllm
from ccfllm.errors import CCFLLMError, CheckpointError
from ccfllm.partial import read_part, save_part
from ccfllm.run_folder import ALLMREC, CCF_LLM, FORMAT, read_run_record, record_kind, run_kind


def test_a_run_records_its_kind_and_provenance(tiny_run):
    record = json.loads((tiny_run / "config.json").read_text())
    assert record["format"] == FORMAT and record["kind"] == CCF_LLM
    assert set(record["provenance"]) == {"version", "commit", "command", "date"}
    assert record["provenance"]["version"] == ccfllm.__version__
    assert run_kind(tiny_run) == CCF_LLM


def test_a_run_of_the_format_before_loads_to_the_same_scores(tiny_run, tiny_dataset, tmp_path):
    """A folder written by ccfllm-run/1: no kind, no provenance."""
    old = shutil.copytree(tiny_run, tmp_path / "old")
    record = json.loads((old / "config.json").read_text())
    del record["kind"], record["provenance"]
    (old / "config.json").write_text(json.dumps({**record, "format": "ccfllm-run/1"}))
    rows = pd.DataFrame({"uid": [1, 2, 3], "iid": [3, 4, 5]})
    scores = [ccfllm.load(run, data=tiny_dataset, device="cpu").score(rows) for run in (tiny_run, old)]
    assert scores[0].equals(scores[1])


def test_a_record_of_another_kind_or_format_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "ccfllm-allmrec/2", "config": {}}))
    assert run_kind(tmp_path) == ALLMREC and read_run_record(tmp_path, ALLMREC)["config"] == {}
    with pytest.raises(CheckpointError, match="is not a ccf-llm run of this version .kind 'allmrec'"):
        read_run_record(tmp_path, CCF_LLM)
    (tmp_path / "config.json").write_text(json.dumps({"format": "ccfllm-allmrec/1"}))
    with pytest.raises(CheckpointError, match=r"format 'ccfllm-allmrec/1'.*`ccfllm allmrec train`"):
        read_run_record(tmp_path, ALLMREC)
    assert record_kind([1, 2]) is None and record_kind({"format": FORMAT, "kind": ALLMREC}) == ALLMREC
    (tmp_path / "empty").mkdir()
    with pytest.raises(CCFLLMError, match="holds no config.json"):
        run_kind(tmp_path / "empty")


def test_a_finished_part_keeps_its_record_tensors_weights_and_random_state(tmp_path):
    torch.manual_seed(3)
    save_part(
        tmp_path / "part",
        {"row": 1},
        tensors={"scores": torch.arange(3.0)},
        device=torch.device("cpu"),
        write_weights=lambda folder: (folder / "w.txt").write_text("w"),
    )
    expected = torch.rand(2)
    torch.manual_seed(4)
    record, tensors = read_part(tmp_path / "part", torch.device("cpu"))
    assert record == {"row": 1} and torch.equal(tensors["scores"], torch.arange(3.0))
    assert torch.equal(torch.rand(2), expected)  # the random numbers go on as after the part
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == [
        "part.json",
        "state.safetensors",
        "w.txt",
    ]
    assert read_part(tmp_path / "part") == ({"row": 1}, {})  # no device: the record alone


def test_a_part_an_earlier_version_left_still_reads(tmp_path):
    """CCF-LLM's stages kept their record in stage.json; A-LLMRec's parts their random-number state
    in random_state.safetensors."""
    save_part(tmp_path / "stage", {"row": 2}, device=torch.device("cpu"))
    (tmp_path / "stage" / "part.json").rename(tmp_path / "stage" / "stage.json")
    (tmp_path / "stage" / "state.safetensors").rename(tmp_path / "stage" / "random_state.safetensors")
    assert read_part(tmp_path / "stage", torch.device("cpu"))[0] == {"row": 2}
    (tmp_path / "stage" / "stage.json").unlink()
    with pytest.raises(CheckpointError, match="part.json is missing: the run folder is incomplete"):
        read_part(tmp_path / "stage")
