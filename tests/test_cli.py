"""The command line end to end on tiny data, and its one-line errors."""

from __future__ import annotations

import calendar
import json
import re

import pandas as pd
import pytest
from click.testing import CliRunner

from ccfllm.cli import main

COMMANDS = [
    [],
    ["data"],
    ["data", "inspect"],
    ["data", "convert-movielens"],
    ["data", "convert-amazon"],
    ["cf"],
    ["cf", "train"],
    ["cf", "evaluate"],
    ["train"],
    ["evaluate"],
    ["predict"],
]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(runner, command):
    result = runner.invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_inspect_train_evaluate_end_to_end(runner, tiny_dir, tmp_path):
    inspected = runner.invoke(main, ["data", "inspect", "--data", str(tiny_dir)])
    assert inspected.exit_code == 0, inspected.output
    assert "positive_rate" in inspected.output and "cold_item_rows" in inspected.output

    out = tmp_path / "run"
    settings = ["--set", "dim=8", "--set", "max_epochs=3", "--set", "lr=0.01", "--set", "max_history=5"]
    trained = runner.invoke(
        main,
        [
            "cf",
            "train",
            "--model",
            "sasrec",
            "--data",
            str(tiny_dir),
            "--out",
            str(out),
            "--seed",
            "1",
            "--quiet",
            *settings,
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert (out / "model.safetensors").is_file() and (out / "embeddings.safetensors").is_file()
    test_line = next(line for line in trained.output.splitlines() if line.startswith("test"))

    predictions = tmp_path / "scores.parquet"
    evaluated = runner.invoke(
        main,
        [
            "cf",
            "evaluate",
            "--checkpoint",
            str(out),
            "--data",
            str(tiny_dir),
            "--predictions",
            str(predictions),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert test_line in evaluated.output.splitlines()  # the reloaded model scores exactly as trained
    frame = pd.read_parquet(predictions)
    assert list(frame.columns) == ["uid", "iid", "label", "score"] and frame["score"].between(0, 1).all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["cf", "train", "--model", "mf", "--set", "dimm=8"],
            "Unknown setting 'dimm' for CFConfig. Did you mean 'dim'?",
        ),
        (["cf", "train", "--model", "mf", "--set", "dim=-1"], "CFConfig.dim must be positive"),
        (["cf", "train", "--model", "mf", "--data", "/no/such/dir"], "No dataset folder found"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(runner, tiny_dir, arguments, message):
    result = runner.invoke(main, arguments)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_existing_run_folder_is_not_overwritten(runner, tiny_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = runner.invoke(
        main, ["cf", "train", "--model", "mf", "--data", str(tiny_dir), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def _unix(month_index: int, user: int) -> int:
    year, month = divmod(3 + month_index, 12)  # month 0 is April 2000, as in ML-1M
    return calendar.timegm((2000 + year, month + 1, 10, user, 0, 0))


def test_convert_movielens_from_the_command_line(runner, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    ratings = [
        f"{user}::{movie}::{5 if (user + movie) % 2 else 2}::{_unix(month, user)}\n"
        for month in range(35)
        for user in range(1, 5)
        for movie in (month % 6 + 1, month % 6 + 7)
    ]
    (raw / "ratings.dat").write_text("".join(ratings))
    (raw / "movies.dat").write_bytes(
        "".join(f"{m}::Film {m} (1999)::Drama\n" for m in range(1, 13)).encode("latin-1")
    )
    result = runner.invoke(main, ["data", "convert-movielens", str(raw), str(tmp_path / "split")])
    assert result.exit_code == 0, result.output
    # 4 users x 2 ratings in each of months 14-23 / 24-28 / 29-33
    assert [line.split()[:2] for line in result.output.splitlines()[-3:]] == [
        ["train", "80"],
        ["valid", "40"],
        ["test", "40"],
    ]
    again = runner.invoke(main, ["data", "convert-movielens", str(raw), str(tmp_path / "split")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_ccf_llm_train_evaluate_predict_end_to_end(runner, tiny_dir, tiny_llm_dir, tmp_path):
    out = tmp_path / "ccf"
    settings = [
        f"llm={tiny_llm_dir}",
        "device=cpu",
        "dtype=float32",
        "train_rows=16",
        "fusion_rows=16",
        "valid_rows=32",
        "eval_every=2",
        "batch_size=8",
        "alg_hidden=8",
        "gate_hidden=4",
        "max_history=3",
        # uncompiled, for speed: test_llm.py checks compiled training steps against uncompiled ones and
        # test_engine.py the compiled scoring layers; below, the reloaded run scores compiled too
        "compile_training=false",
        "compile_scoring=false",
    ]
    arguments = ["train", "--data", str(tiny_dir), "--out", str(out), "--quiet"]
    trained = runner.invoke(main, arguments + [item for s in settings for item in ("--set", s)])
    assert trained.exit_code == 0, trained.output
    table = [line for line in trained.output.splitlines() if line.startswith("| ") and "test AUC" not in line]
    assert [line.split(" | ")[0] for line in table] == [
        "| mf (CF backbone alone)",
        "| mean-label reference (k=5)",
        "| CCF-LLM after stage lora",
        "| CCF-LLM after stage fusion",
        "| Δ vs mf (CF backbone alone) [95% interval, users resampled]",
    ]
    test_auc = table[-2].split(" | ")[1]
    # the final model minus the backbone, in AUC and UAUC: "+0.0123 [+0.0040, +0.0201]"
    backbone, final, delta = (
        [float(cell.split()[0]) for cell in table[row].split(" | ")[1:3]] for row in (0, 3, 4)
    )
    for column, cell in enumerate(table[-1].split(" | ")[1:3]):
        assert re.fullmatch(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( \|)?", cell), cell
        assert abs(delta[column] - (final[column] - backbone[column])) <= 1.5e-4  # the rounded figures

    evaluated = runner.invoke(
        main, ["evaluate", "--run", str(out), "--data", str(tiny_dir), "--split", "test"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    test_line = next(line for line in evaluated.output.splitlines() if line.startswith("test "))
    assert test_line.split()[1] == test_auc  # the reloaded run scores exactly as it did in training
    compiled = runner.invoke(
        main,
        ["evaluate", "--run", str(out), "--data", str(tiny_dir), "--split", "test", "--compile-scoring"],
    )
    assert compiled.exit_code == 0, compiled.output
    assert test_line in compiled.output.splitlines()  # the same figures through the compiled layers
    assert "torch.compile failed" not in compiled.output

    rows = tmp_path / "rows.csv"
    rows.write_text("uid,iid\n1,2\n999,2\n")
    scores = tmp_path / "scores.parquet"

    def predict(rows, scores):
        arguments = ["--run", out, "--data", tiny_dir, "--input", rows, "--output", scores]
        return runner.invoke(main, ["predict", *map(str, arguments)])

    predicted = predict(rows, scores)
    assert predicted.exit_code == 0, predicted.output
    assert pd.read_parquet(scores)["cf"].tolist() == ["user+item", "item only"]

    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n1,2\n")
    refused = predict(bad, tmp_path / "never.parquet")
    assert refused.exit_code == 2 and "need columns uid and iid" in refused.output
    assert not (tmp_path / "never.parquet").exists()


def test_a_sigterm_handled_inside_a_weakref_callback_still_ends_the_run():
    """Python ignores an exception raised in a weakref callback; a SIGTERM handled there once went
    unheeded while a real run trained on. Here the signal arrives inside such a callback."""
    import signal
    import subprocess
    import sys

    script = """
import os, signal, time, weakref
from ccfllm.cli import unwind_on_sigterm
unwind_on_sigterm()
class Thing: pass
def callback(reference):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10_000):
        pass  # the handler runs here, inside the callback
thing = Thing()
reference = weakref.ref(thing, callback)
del thing
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    pass
print("still running")
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (process.returncode, process.stdout) == (128 + signal.SIGTERM, "")


def test_a_terminated_run_keeps_only_its_finished_parts(runner, tiny_dir, tiny_llm_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs" / "killed"
    partial = out.with_name("killed.partial")
    settings = [f"llm={tiny_llm_dir}", "device=cpu", "dtype=float32", "alg_hidden=8", "gate_hidden=4"]
    settings += ["train_rows=4000", "batch_size=2", "eval_every=1000", "max_history=3"]  # long enough to kill
    arguments = ["train", "--data", str(tiny_dir), "--out", str(out)]
    arguments += ["--quiet", *[item for s in settings for item in ("--set", s)]]
    command = [sys.executable, "-m", "ccfllm.cli", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (partial / "cf").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)  # the run is under way: its backbone is saved
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert "--resume continues" in process.stderr.read()
    # no run folder, no temporary folder: only the finished backbone and the run's settings
    assert list(out.parent.iterdir()) == [partial]
    assert sorted(p.name for p in partial.iterdir()) == ["cf", "config.json"]
    assert sorted(p.name for p in (partial / "cf").iterdir()) == [
        "embeddings.safetensors", "metrics.json", "model.safetensors"
    ]  # fmt: skip
    again = runner.invoke(main, arguments)
    assert again.exit_code == 2 and "pass --resume to continue it" in again.output


def test_allmrec_train_prints_its_table(runner, tiny_dir, tiny_llm_dir, tmp_path):
    from test_text_encoder import save_tiny_bert

    encoder = save_tiny_bert(tmp_path / "sbert", "mean", True)
    settings = [f"llm={tiny_llm_dir}", f"encoder={encoder}", "device=cpu", "dtype=float32", "n_candidates=5"]
    settings += ["compile_training=false"]  # test_allmrec.py checks compiled stage-2 steps against these
    settings += ["sasrec_dim=16", "sasrec_history=10", "sasrec_epochs=2", "latent_dim=8", "hidden=16"]
    settings += ["stage1_epochs=1", "stage1_batch=8", "prompt_history=4", "test_rows=12"]
    arguments = ["allmrec", "train", "--data", str(tiny_dir), "--out", str(tmp_path / "run"), "--quiet"]
    result = runner.invoke(main, arguments + [item for s in settings for item in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert "Rows behind each figure: rows: 12," in result.output
    assert "| A-LLMRec (SBERT) | 0." in result.output
    assert "## Speed against TALLRec" in result.output and "| training (s) |" in result.output
    assert (
        "Specify the genres this user would enjoy." in result.output and "Hit@1 cold users" in result.output
    )
    evaluated = runner.invoke(
        main, ["allmrec", "evaluate", "--run", str(tmp_path / "run"), "--data", str(tiny_dir)]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "A-LLMRec           hit@1 0." in evaluated.output  # after the progress bars on stderr
    assert "A-LLMRec (SBERT)   hit@1 0." in evaluated.output
    run = str(tmp_path / "run")
    reported = runner.invoke(main, ["allmrec", "report", "--run", run, "--out", str(tmp_path)])
    assert reported.exit_code == 0 and (tmp_path / "report.md").read_text() in reported.output
    refused = runner.invoke(main, ["allmrec", "train", "--set", "variant=mlp"])
    assert refused.exit_code == 2 and "variant must be one of ['a-llmrec', 'mlp-llm']" in refused.output


def test_report_refuses_a_run_folder_that_is_not_a_saved_run_and_writes_nothing(
    runner, tmp_path, tiny_dir, tiny_dataset
):
    results = tmp_path / "results.jsonl"
    header = {"format": "ccfllm-results/1", "dataset": tiny_dataset.fingerprint()}
    mf = {
        "key": "cpu/mf/mf/default/seed0",
        **{"method": "mf", "backbone": "mf", "variant": "default", "seed": 0, "preset": "cpu"},
        **{"test_auc": 0.7, "test_uauc": 0.65, "folder": str(tmp_path / "gone")},
        "provenance": {"commit": "abc1234", "machine": "test box", "wall_s": 60.0},
    }
    results.write_text(json.dumps(header) + "\n" + json.dumps(mf) + "\n")
    not_a_run, out = tmp_path / "not-a-run", tmp_path / "report"
    not_a_run.mkdir()
    args = ["report", "--results", results, "--out", out, "--data", tiny_dir, "--run", not_a_run]
    result = runner.invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and "config.json is missing" in result.output
    assert not out.exists()


# Every command that writes, pointed at a place under a plain file (no folder can be made there, for
# root too): one line, exit status 2, before any work, nothing written.
UNWRITABLE_OUTPUTS = {
    "cf train": ["cf", "train", "--model", "mf", "--out", "{bad}/run"],
    "train": ["train", "--out", "{bad}/run"],
    "allmrec train": ["allmrec", "train", "--out", "{bad}/run"],
    "compare --results": ["compare", "--results", "{bad}/results.jsonl", "--runs", "{tmp}/runs"],
    "compare --runs": ["compare", "--results", "{tmp}/results.jsonl", "--runs", "{bad}/runs"],
    "data convert-movielens": ["data", "convert-movielens", "{tmp}", "{bad}/split"],
}


@pytest.mark.parametrize("case", sorted(UNWRITABLE_OUTPUTS))
def test_an_output_that_cannot_be_created_is_one_line_and_writes_nothing(runner, tiny_dir, tmp_path, case):
    bad = tmp_path / "a-file"
    bad.write_text("mine")
    arguments = [a.format(bad=bad, tmp=tmp_path) for a in UNWRITABLE_OUTPUTS[case]]
    data = [] if case.startswith("data") else ["--data", str(tiny_dir)]
    result = runner.invoke(
        main, [*arguments, *data, "--quiet"] if case != "data convert-movielens" else arguments
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: Cannot write to {bad}") and len(result.output.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_list_columns_of_different_lengths_are_one_line(runner, tiny_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "data")
    (folder / "items.parquet").unlink()  # the titles then come from the title and his_title columns
    frame = pd.read_parquet(folder / "train.parquet")
    frame["his_title"] = [[*titles, "one too many"] if row == 3 else titles
                          for row, titles in enumerate(frame["his_title"].map(list))]  # fmt: skip
    frame.to_parquet(folder / "train.parquet", index=False)
    result = runner.invoke(main, ["data", "inspect", "--data", str(folder)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {folder / 'train.parquet'}, row 3: 'his' holds ")
    assert "his_title needs one title per history item" in result.output
