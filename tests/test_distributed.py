"""Data-parallel `ccfllm train` on 2 CPU processes (gloo), against one process with the same global
batch, on the tiny data and the tiny Llama: the same losses and weights, the same metrics; a rank
killed mid-stage ends both, and --resume finishes as the unbroken run did."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

# The tiny settings of conftest.TINY_CCF, with no LoRA dropout (each rank draws its own masks, so
# with dropout two processes train on other masks than one: the same distribution, other numbers)
# and 60 rows a stage, so that batches of 7 and 8 rows split unevenly (4 + 3) over the two ranks.
SETTINGS = dict(
    device="cpu", dtype="float32", alg_hidden=16, gate_hidden=8, batch_size=8, eval_batch_size=8,
    train_rows=60, fusion_rows=60, valid_rows=64, eval_every=4, epochs=1, lr_lora=5e-3, lr_fusion=5e-3,
    max_history=3, lora_dropout=0, compile_training=False, compile_scoring=False,
)  # fmt: skip
WEIGHTS = ("adapter/adapter_model.safetensors", "fusion.safetensors")
ACCELERATE = [
    str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip


def train_arguments(data: Path, llm: Path, out: Path, *extra: str) -> list[str]:
    settings = [
        part for key, value in {**SETTINGS, "llm": llm}.items() for part in ("--set", f"{key}={value}")
    ]
    return ["-m", "ccfllm", "train", "--data", str(data), "--out", str(out), "--quiet", *settings, *extra]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run(command: list[str]) -> None:
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, tiny_llm_dir) -> dict[int, Path]:
    """The same run by one process (no launcher) and by two (`accelerate launch`)."""
    folder = tmp_path_factory.mktemp("ddp")
    one, two = folder / "one", folder / "two"
    run([sys.executable, *train_arguments(tiny_dir, tiny_llm_dir, one)])
    run([*ACCELERATE, *train_arguments(tiny_dir, tiny_llm_dir, two)])  # -m ccfllm: as the launcher takes it
    return {1: one, 2: two}


def metrics(run_folder: Path) -> dict:
    return json.loads((run_folder / "metrics.json").read_text())


def test_two_processes_train_and_score_as_one(runs):
    one, two = metrics(runs[1]), metrics(runs[2])
    for stage_one, stage_two in zip(one["stages"], two["stages"], strict=True):
        assert [c["step"] for c in stage_one["curve"]] == [c["step"] for c in stage_two["curve"]]
        for point_one, point_two in zip(stage_one["curve"], stage_two["curve"], strict=True):
            if point_one["train_loss"] is not None:  # the mean loss of the global batches since the last
                assert point_two["train_loss"] == pytest.approx(point_one["train_loss"], abs=1e-5)
            # valid scoring shares the engine's batches out: the same scores, so the same AUC
            assert point_two["valid_auc"] == pytest.approx(point_one["valid_auc"], abs=1e-9)
    for name in WEIGHTS:
        weights_one, weights_two = load_file(runs[1] / name), load_file(runs[2] / name)
        assert weights_one.keys() == weights_two.keys()
        for key, value in weights_one.items():
            np.testing.assert_allclose(weights_two[key].numpy(), value.numpy(), atol=1e-5, rtol=0)
    scores = [pd.read_parquet(r / "predictions.parquet") for r in (runs[1], runs[2])]
    assert scores[0][["uid", "iid"]].equals(scores[1][["uid", "iid"]])  # gathered in row order
    np.testing.assert_allclose(scores[1]["score"], scores[0]["score"], atol=1e-6, rtol=0)
    # The weights agree to about 1e-7 (the ranks' gradients are summed in another order than one
    # batch's), and the tiny random model scores the test rows within 0.005 of each other, a few
    # within 1e-7: so AUC, a rank statistic, agrees to 1e-4 rather than to the bit.
    for row_one, row_two in zip(one["table"], two["table"], strict=True):
        assert row_one["model"] == row_two["model"]
        assert row_two["test_auc"] == pytest.approx(row_one["test_auc"], abs=1e-4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ranks(arguments: list[str]) -> list[subprocess.Popen]:
    """The two processes a launcher would start (its environment: RANK, WORLD_SIZE, MASTER_*), started
    here so that the test holds each one's pid and no launcher stops the survivor for it."""
    port = str(free_port())
    shared = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return [
        subprocess.Popen(
            [sys.executable, *arguments],
            env=environment(RANK=str(rank), LOCAL_RANK=str(rank), **shared),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def test_a_rank_killed_mid_stage_ends_both_and_resume_ends_as_unbroken(runs, tiny_dir, tiny_llm_dir):
    out = runs[2].with_name("killed")
    stages = out.with_name("killed.partial") / "stages"
    first, second = ranks(train_arguments(tiny_dir, tiny_llm_dir, out))
    deadline = time.monotonic() + 120
    while not list(stages.glob("*.progress.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)  # until rank 0 has saved a stage's progress at its first validation
    second.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert first.wait(timeout=30) != 0 and second.wait(timeout=30) == -signal.SIGKILL
    assert time.monotonic() - killed < 10  # the survivor's next collective fails at once: no hang
    error = first.stderr.read()
    assert "peer" in error, error[-3000:]  # gloo: "Connection closed by peer", or reset by it
    in_progress = [
        p.name.removesuffix(".progress.safetensors") for p in stages.glob("*.progress.safetensors")
    ]
    assert in_progress and not any((stages / name).is_dir() for name in in_progress)  # mid-stage
    run([*ACCELERATE, *train_arguments(tiny_dir, tiny_llm_dir, out, "--resume")])
    resumed, unbroken = metrics(out), metrics(runs[2])
    assert resumed["table"] == unbroken["table"]
    assert [s["curve"] for s in resumed["stages"]] == [s["curve"] for s in unbroken["stages"]]
    for name in WEIGHTS:
        weights, expected = load_file(out / name), load_file(runs[2] / name)
        assert all(np.array_equal(weights[key].numpy(), expected[key].numpy()) for key in expected)
