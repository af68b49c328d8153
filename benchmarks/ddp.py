"""1 against 2 data-parallel processes of `ccfllm train` on the embedded SmolLM2, one thread each: the
rows per second of each stage, whether the figures agree, and what the gradient all-reduce costs.

    nice -n 19 .venv/bin/python benchmarks/ddp.py --rows 64 --out /tmp/ddp-bench

Each run is a real `ccfllm train` (the 2-process one under `accelerate launch`), with a stage of
`--rows` training rows, `--rows` valid rows and `--rows` test rows, the global batch `--batch`, no
compiling. A stage's rows/s counts its training rows over its seconds (validations included). The
all-reduce is timed alone, on 2 gloo processes, over a float32 buffer of the size each stage
all-reduces (its trainable parameters), and set against the stage's time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCELERATE = [
    str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_command(out: Path, rows: int, batch: int) -> list[str]:
    settings = dict(
        train_rows=rows, fusion_rows=rows, valid_rows=rows, test_rows=rows, batch_size=batch,
        eval_every=0, epochs=1, lora_dropout=0, compile_training=False, compile_scoring=False,
        device="cpu",
    )  # fmt: skip
    pairs = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    return ["-m", "ccfllm", "train", "--out", str(out), "--overwrite", "--quiet", *pairs]


def timed_run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=ONE_THREAD, check=True, capture_output=True)
    return time.perf_counter() - started


def trainable_sizes(run: Path) -> dict[str, int]:
    """The number of parameters each stage trained (and all-reduced), read from the run's weights."""
    from safetensors.torch import load_file

    count = lambda path: sum(t.numel() for t in load_file(path).values())  # noqa: E731
    return {
        "lora": count(run / "adapter/adapter_model.safetensors"),
        "fusion": count(run / "fusion.safetensors"),
    }


def all_reduce_probe(size: int, repeats: int) -> None:
    """Under a launcher: time `repeats` all-reduces of `size` float32 numbers; rank 0 prints ms each."""
    import torch

    from ccfllm.distributed import current_world

    world = current_world("cpu")
    parameter = torch.nn.Parameter(torch.zeros(size))
    parameter.grad = torch.ones(size)
    world.sum_gradients([parameter], torch.zeros(()))  # the first one sets the connection up
    started = time.perf_counter()
    for _ in range(repeats):
        world.sum_gradients([parameter], torch.zeros(()))
    if world.is_main:
        print(json.dumps({"size": size, "ms": 1000 * (time.perf_counter() - started) / repeats}))


def free_port() -> int:
    """A port nothing listens on: the launcher's default (29500) can still be held by the run before."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def probe_all_reduce(size: int) -> float:
    done = subprocess.run(
        [*ACCELERATE, "--main_process_port", str(free_port()), __file__, "--probe", str(size)],
        env=ONE_THREAD,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="training, valid and test rows of each stage")
    parser.add_argument("--batch", type=int, default=8, help="the global batch")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddp-bench"))
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # the all-reduce timing, launched
    args = parser.parse_args()
    if args.probe:
        return all_reduce_probe(args.probe, repeats=50)
    seconds, metrics = {}, {}
    for processes in (1, 2):
        out = args.out / f"{processes}-process"
        command = train_command(out, args.rows, args.batch)
        launcher = (
            [sys.executable] if processes == 1 else [*ACCELERATE, "--main_process_port", str(free_port())]
        )
        seconds[processes] = timed_run([*launcher, *command])
        metrics[processes] = json.loads((out / "metrics.json").read_text())
        print(f"{processes} process(es): the whole run {seconds[processes]:.1f} s")
    sizes = trainable_sizes(args.out / "1-process")
    print("| stage | processes | steps | seconds | rows/s | ms/step | all-reduce ms/step |")
    print("|---|---|---|---|---|---|---|")
    for index, stage in enumerate(metrics[1]["stages"]):
        name = stage["stage"]
        reduce_ms = probe_all_reduce(sizes[name])
        for processes in (1, 2):
            run = metrics[processes]["stages"][index]
            rows_per_s = run["steps"] * args.batch / run["seconds"]
            per_step = 1000 * run["seconds"] / run["steps"]
            reduce = f"{reduce_ms:.2f} ({sizes[name]:,} floats)" if processes == 2 else "-"
            print(f"| {name} | {processes} | {run['steps']} | {run['seconds']:.1f} | {rows_per_s:.2f} "
                  f"| {per_step:.0f} | {reduce} |")  # fmt: skip
    for row_one, row_two in zip(metrics[1]["table"], metrics[2]["table"], strict=True):
        gap = abs(row_one["test_auc"] - row_two["test_auc"])
        auc_one, auc_two = row_one["test_auc"], row_two["test_auc"]
        print(f"{row_one['model']}: test AUC {auc_one:.6f} (1) {auc_two:.6f} (2), |Δ| {gap:.1e}")
    losses = [
        (a["train_loss"], b["train_loss"])
        for s1, s2 in zip(metrics[1]["stages"], metrics[2]["stages"], strict=True)
        for a, b in zip(s1["curve"], s2["curve"], strict=True)
        if a["train_loss"] is not None
    ]
    gaps = [abs(one - two) for one, two in losses]
    print(f"largest train-loss gap between 1 and 2 processes: {max(gaps):.1e}")


if __name__ == "__main__":
    main()
