"""How fast CCF-LLM scores and trains here, against the naive path and the FLOP bound (issue #5).

    .venv/bin/python benchmarks/speed.py --run runs/ccf-llm/mf-cpu-seed0
    python benchmarks/speed.py --run RUN --device cuda --eval-batch 64     # the same on a GPU

Measures, each part in its own process (so that each reports its own peak resident memory), with
malloc set to reuse freed memory as the `ccfllm` command sets it (`ccfllm.device.keep_freed_memory`):
  - the bf16 and fp32 matmul throughput of torch at the LLM's shapes (GFLOP/s; the best is the peak);
  - the FLOP bound for scoring the test split: (2 x non-embedding parameters x prompt tokens
    + attention + the output layer at the answer) / peak bf16 throughput;
  - the engine scoring the whole test split in the run's dtype: seconds and test AUC;
  - the engine in float32 and the naive path (float32, batches padded to their longest prompt,
    full-vocabulary logits at every position, no cache) on a seeded sample of test rows: the largest
    score difference between them, and the naive time extrapolated to the split (per row); the naive
    path once more with glibc's malloc defaults, to show what that setting alone is worth to it;
  - the AUC moved by bf16: the engine in bf16 versus float32 on the same sample;
  - training rows/s of stage 1 and stage 2, engine (run dtype, compiled layers) versus naive (float32,
    peft's dropout), from the run's weights, taking turns a step each on the same batches: each path's
    loss per step; then each path alone for a few steps, for its peak memory.
Scoring runs each Llama layer as one compiled function, as the `cpu` preset does (`compile_scoring`);
`--compile-scoring off` scores through the decoder's own forward, as runs made before that setting did;
`--scoring-only` skips the training parts, `--stages lora` the fusion stage (a TALLRec run has none);
for a large LLM on a CPU, `--engine-rows sample` times the engine on the seeded sample too (extrapolated
per row to the split, as the naive path is) and `--no-glibc` skips the naive path's second pass.
Prints one table; writes the measurements to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ccfllm.data import load_collm_split
from ccfllm.data.paths import resolve_data_dir
from ccfllm.device import cpu_has_bf16, cpu_kind, keep_freed_memory
from ccfllm.engine import naive_log_probs, naive_score_rows, score_rows, use_plain_lora_dropout
from ccfllm.errors import CCFLLMError
from ccfllm.io import write_json
from ccfllm.metrics import auc
from ccfllm.recommender import load_run, read_run_config
from ccfllm.train import Stage, loss_for, sample_rows, trainable_parameters, training_step


def measure_matmul(dtype: torch.dtype, hidden: int, intermediate: int, kv: int, device: torch.device) -> dict:
    """GFLOP/s of (tokens, k) @ (k, n) at the decoder's projection shapes, for a batch's worth of
    tokens (1,024: a CPU batch) and a GPU batch's (8,192)."""
    results = {}
    shapes = [(hidden, hidden), (hidden, kv), (hidden, intermediate), (intermediate, hidden)]
    for tokens in (1024, 8192):
        for k, n in shapes:
            a = torch.randn(tokens, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(3):
                a @ b
            repeats, started = 0, _clock(device)
            while _clock(device) - started < 1.0:
                for _ in range(10):
                    a @ b
                repeats += 10
            seconds = _clock(device) - started
            results[f"{tokens}x{k}x{n}"] = 2 * tokens * k * n * repeats / seconds / 1e9
    return results


def _clock(device: torch.device) -> float:
    """Wall time once the device has finished the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def scoring_flops(model, prompts, split) -> dict:
    """The naive FLOP count of scoring `split`: decoder matmuls, attention, the answer's output layer."""
    config = model.llm.get_base_model().config
    lengths = np.array(
        [len(prompts.encode(int(i), h).input_ids) for i, h in zip(split.iid, split.history, strict=True)]
    )
    non_embedding = sum(
        p.numel() for n, p in model.llm.get_base_model().model.named_parameters() if "embed_tokens" not in n
    )
    non_embedding -= sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    head_dim = config.hidden_size // config.num_attention_heads
    # QK^T and AV, causal: a token at position t attends to t + 1 keys
    attention = (
        4
        * config.num_hidden_layers
        * config.num_attention_heads
        * head_dim
        * (lengths * (lengths + 1) / 2).sum()
    )
    output_layer = 2 * config.hidden_size * config.vocab_size * len(lengths)
    return {
        "rows": len(lengths),
        "tokens": int(lengths.sum()),
        "non_embedding_parameters": int(non_embedding),
        "flops": float(2 * non_embedding * lengths.sum() + attention + output_layer),
    }


# -- the parts, each run in a child process -------------------------------------------------------------


def part_matmul(args) -> dict:
    dataset = _dataset(args)
    recommender = load_run(args.run, dataset, device=args.device)
    config = recommender.model.llm.get_base_model().config
    shapes = dict(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv=config.num_key_value_heads * config.hidden_size // config.num_attention_heads,
        device=_device_of(recommender.model),
    )
    # bf16 is timed only where it is native: emulated (AVX2) it runs at about 1 GFLOP/s, and these
    # shapes would take half an hour to say so
    native_bf16 = shapes["device"].type == "cuda" or cpu_has_bf16()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if native_bf16 else {"fp32": torch.float32}
    prompts = recommender.final_prompts()
    return {
        **{name: measure_matmul(dtype, **shapes) for name, dtype in dtypes.items()},
        "work": scoring_flops(recommender.model, prompts, dataset.test),
    }


def part_score(args) -> dict:
    dataset = _dataset(args)
    recommender = load_run(args.run, dataset, device=args.device, dtype=args.dtype)
    prompts = recommender.final_prompts()
    test = dataset.test
    rows = np.arange(len(test)) if args.rows == "all" else _sample(test, args.sample)
    score = naive_score_rows if args.path == "naive" else score_rows
    recommender.model.compile_scoring = args.compile_scoring == "on"
    engine_batch = args.eval_batch or recommender.config.eval_batch_size
    batch = args.naive_batch if args.path == "naive" else engine_batch
    score(recommender.model, prompts, test, rows[: 2 * batch], batch)  # warm-up, untimed
    started = _clock(_device_of(recommender.model))
    scores = score(recommender.model, prompts, test, rows, batch, progress=True)
    seconds = _clock(_device_of(recommender.model)) - started
    sample = np.searchsorted(rows, _sample(test, args.sample))  # where the sample rows sit in `rows`
    return {
        "dtype": str(next(recommender.model.parameters()).dtype).removeprefix("torch."),
        "rows": len(rows),
        "seconds": seconds,
        "auc": auc(test.label[rows], scores),
        "sample_scores": scores[sample].tolist(),
        "sample_auc": auc(test.label[rows][sample], scores[sample]),
    }


def part_train(args) -> dict:
    """Training rows/s of one stage. With `--path both` (what the table reports) the engine and the
    naive path take turns, a step each on the same batches, so that both meet the machine in the same
    state: on a shared machine its speed drifts by 10-20% over minutes. One path alone gives that
    path's peak memory."""
    dataset = _dataset(args)
    paths = ["engine", "naive"] if args.path == "both" else [args.path]
    trainers = {path: _trainer(args, dataset, path) for path in paths}
    results = {}
    for path, (model, _, batches, log_probs, loss) in trainers.items():
        started = _clock(_device_of(model))
        _warm_up(model, batches[:3], log_probs, loss)
        results[path] = {"warm_up_seconds": _clock(_device_of(model)) - started, "seconds": 0.0, "losses": []}
        results[path]["compiled"] = model.compile_training
    for step in range(args.train_steps):
        for path, (model, optimiser, batches, log_probs, loss) in trainers.items():
            torch.manual_seed(step)  # each path's dropout draws from the same seed at each step
            started = _clock(_device_of(model))
            results[path]["losses"].append(training_step(model, batches[step], optimiser, loss, log_probs))
            results[path]["seconds"] += _clock(_device_of(model)) - started
    rows = sum(len(batch.label) for batch in trainers[paths[0]][2])  # the same batches for every path
    for result in results.values():
        result["rows"], result["rows_per_s"] = rows, rows / result["seconds"]
    return results if args.path == "both" else results[args.path]


def _trainer(args, dataset, path: str) -> tuple:
    """The run's model set up to train stage `args.stage` the engine's way (the run's dtype, compiled
    layers as the cpu preset trains) or the naive way (float32, peft's dropout, the LM's own forward
    with full-vocabulary logits), its optimiser, the batches, the forward and the loss."""
    dtype = "float32" if path == "naive" else args.dtype
    recommender = load_run(args.run, dataset, device=args.device, dtype=dtype)
    model, config, stage = recommender.model, recommender.config, Stage(args.stage)
    model.compile_training = path == "engine" and args.compile == "on"
    if path == "naive":
        use_plain_lora_dropout(model)
    parameters = trainable_parameters(model, stage, config.tune_cf)
    lr = config.lr_lora if stage == Stage.LORA else config.lr_fusion
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    prompts, train = recommender.prompts_for(stage), dataset.train
    rows = sample_rows(len(train), args.train_steps * config.batch_size, np.random.default_rng(0))
    batches = [
        prompts.batch(train.uid[b], train.iid[b], train.history[b], train.label[b]).to(_device_of(model))
        for b in np.array_split(rows, args.train_steps)
    ]
    model.train()
    log_probs = naive_log_probs if path == "naive" else type(model).forward
    return model, optimiser, batches, log_probs, loss_for(config)


def _warm_up(model, batches, log_probs, loss) -> None:
    """Untimed forward/backward passes that leave the weights as they were: a GPU's first passes
    load kernels and pick algorithms, and compiled layers compile (its time is reported apart), which
    50 timed steps should not pay for. Batches of different lengths, as the timed steps have."""
    for batch in batches:
        loss(log_probs(model, batch), batch.label).backward()
    model.zero_grad(set_to_none=True)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


PARTS = {"matmul": part_matmul, "score": part_score, "train": part_train}


def _dataset(args):
    """The dataset as the run loaded it (its history length is part of the dataset's fingerprint)."""
    config = read_run_config(args.run)["config"]
    return load_collm_split(args.data, max_history=config["max_history"])


def _sample(test, size: int) -> np.ndarray:
    return sample_rows(len(test), size, np.random.default_rng(12345))


def run_part(args, part: str, **options) -> dict:
    """Run one part in a fresh process; return its result with its peak resident memory."""
    command = [sys.executable, __file__, "--part", part, "--run", str(args.run), "--data", str(args.data)]
    command += ["--device", args.device, "--eval-batch", str(args.eval_batch), "--compile", args.compile]
    command += ["--allocator", options.pop("allocator", "tuned"), "--compile-scoring", args.compile_scoring]
    command += [
        "--sample",
        str(args.sample),
        "--train-steps",
        str(args.train_steps),
        "--naive-batch",
        str(args.naive_batch),
    ]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    print("$", " ".join(command[1:]), flush=True)
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if finished.returncode:
        sys.exit(f"speed.py: part {part} failed (exit status {finished.returncode}); its error is above.")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a saved CCF-LLM run folder")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: the shipped split)")
    parser.add_argument("--sample", type=int, default=1024, help="test rows for the naive path and fp32")
    parser.add_argument("--train-steps", type=int, default=50, help="training steps per stage and path")
    parser.add_argument("--naive-batch", type=int, default=8)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda:N'")
    parser.add_argument(
        "--eval-batch", type=int, default=0, help="prefixes per scoring batch of the engine (0: the run's)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--path", choices=["engine", "naive", "both"], default="engine", help=argparse.SUPPRESS
    )
    parser.add_argument("--rows", choices=["all", "sample"], default="sample", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="lora", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compile", choices=["on", "off"], default="on", help="engine training with compiled layers"
    )
    parser.add_argument(
        "--compile-scoring",
        choices=["on", "off"],
        default="on",
        help="engine scoring with each Llama layer compiled (on: as the cpu preset scores)",
    )
    parser.add_argument("--scoring-only", action="store_true", help="skip the training parts (about 15 min)")
    parser.add_argument("--stages", default="lora,fusion", help="training stages measured, comma-separated")
    parser.add_argument(
        "--engine-rows", choices=["all", "sample"], default="all", help="test rows the engine scores in bf16"
    )
    parser.add_argument("--no-glibc", action="store_true", help="skip the naive pass with glibc's malloc")
    parser.add_argument("--allocator", choices=["tuned", "glibc"], default="tuned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.data = resolve_data_dir(args.data)
        read_run_config(args.run)
    except CCFLLMError as exc:
        parser.error(str(exc))
    if args.part:
        if args.allocator == "tuned":
            keep_freed_memory()  # as the ccfllm command does, for every part and both paths
        result = PARTS[args.part](args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if torch.cuda.is_initialized():
            result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(result))
        return
    report(args, measure(args))


def measure(args) -> dict:
    results = {
        "machine": _machine(args.device),
        "run": str(args.run),
        "sample": args.sample,
        "train_steps": args.train_steps,
        "device": args.device,
        "eval_batch": args.eval_batch,
        "compile_scoring": args.compile_scoring,
    }
    results["matmul"] = run_part(args, "matmul")
    results["engine"] = run_part(args, "score", path="engine", rows=args.engine_rows)
    if results["engine"]["dtype"] == "float32" and args.engine_rows == "sample":
        results["engine_fp32"] = results["engine"]  # the run's dtype is float32 here: the same measurement
    else:
        results["engine_fp32"] = run_part(args, "score", path="engine", rows="sample", dtype="float32")
    results["naive"] = run_part(args, "score", path="naive", rows="sample", dtype="float32")
    if not args.no_glibc:
        results["naive_glibc"] = run_part(
            args, "score", path="naive", rows="sample", dtype="float32", allocator="glibc"
        )
    for stage in () if args.scoring_only else args.stages.split(","):
        results[f"train_{stage}"] = run_part(args, "train", path="both", stage=stage)
        for path in ("engine", "naive"):  # each alone, a few steps, for its peak memory
            results[f"train_{stage}_{path}_memory"] = run_part(
                args, "train", path=path, stage=stage, train_steps=5
            )
    write_json(args.out, results)
    return results


def report(args, r: dict) -> None:
    engine_dtype = "bf16" if r["engine"]["dtype"] == "bfloat16" else "fp32"
    peak = max(r["matmul"][engine_dtype].values())  # the bound of the dtype the engine computes in
    work = r["matmul"]["work"]
    bound = work["flops"] / (peak * 1e9)
    engine, naive, fp32 = r["engine"], r["naive"], r["engine_fp32"]
    naive_glibc = r.get("naive_glibc")
    engine_s, naive_s = (part["seconds"] / part["rows"] * work["rows"] for part in (engine, naive))
    bound_target, naive_target, train_target = _targets(args.run, engine_dtype)
    gap = np.abs(np.array(fp32["sample_scores"]) - np.array(naive["sample_scores"])).max()
    moved = abs(engine["sample_auc"] - fp32["sample_auc"])
    print(f"\nmachine: {r['machine']}")
    peaks = {name: max(r["matmul"][name].values()) for name in ("bf16", "fp32") if name in r["matmul"]}
    print("peak matmul GFLOP/s: " + ", ".join(f"{name} {value:.0f}" for name, value in peaks.items()))
    print("  per shape, " + ", ".join(f"{name} {_rounded(r['matmul'][name])}" for name in peaks))
    print(
        f"test split: {work['rows']} rows, {work['tokens']} prompt tokens, "
        f"{work['non_embedding_parameters'] / 1e6:.1f} M non-embedding parameters, "
        f"{work['flops'] / 1e12:.1f} TFLOP the naive way -> FLOP bound {bound:.3g} s at the "
        f"{engine_dtype} peak (the engine's dtype)"
    )
    rows = [
        (
            f"engine ({engine['rows']} test rows, run dtype{_extrapolated(engine, work)})",
            f"{engine_s:.0f} s, AUC {engine['auc']:.4f}",
            f"{engine_s / bound:.2f}x",
            f"{naive_s / engine_s:.1f}x",
            _memory(engine),
            f"<= {bound_target}x bound: {_met(engine_s / bound <= bound_target)}"
            + (
                f"; >= {naive_target}x naive: {_met(naive_s / engine_s >= naive_target)}"
                if naive_target
                else ""
            ),
        ),
        (
            f"naive fp32 ({naive['rows']} rows, extrapolated)",
            f"{naive_s:.0f} s",
            f"{naive_s / bound:.2f}x",
            "1.0x",
            _memory(naive),
            "",
        ),
        (
            f"max score gap, engine fp32 vs naive ({naive['rows']} rows)",
            f"{gap:.1e}",
            "",
            "",
            "",
            f"<= 1e-3: {_met(gap <= 1e-3)}",
        ),
        (
            f"AUC on those rows, engine {engine_dtype} / fp32",
            f"{engine['sample_auc']:.4f} / {fp32['sample_auc']:.4f} (moved {moved:.4f})",
            "",
            "",
            _memory(fp32),
            f"<= 0.002: {_met(moved <= 0.002)}",
        ),
    ]
    if naive_glibc:
        naive_glibc_s = naive_glibc["seconds"] / naive_glibc["rows"] * work["rows"]
        rows.insert(
            2,
            (
                f"naive fp32, malloc left at glibc's defaults ({naive_glibc['rows']} rows, extrapolated)",
                f"{naive_glibc_s:.0f} s",
                f"{naive_glibc_s / bound:.2f}x",
                f"engine: {naive_glibc_s / engine_s:.1f}x",
                _memory(naive_glibc),
                "",
            ),
        )
    for stage in (s for s in ("lora", "fusion") if f"train_{s}" in r):
        fast, slow = r[f"train_{stage}"]["engine"], r[f"train_{stage}"]["naive"]
        fast_losses, slow_losses = np.array(fast["losses"]), np.array(slow["losses"])
        loss_gap = np.abs(fast_losses - slow_losses).max()
        speedup = fast["rows_per_s"] / slow["rows_per_s"]
        rows.append(
            (
                f"train stage {stage}, rows/s engine / naive ({len(fast_losses)} steps each, taking turns)",
                f"{fast['rows_per_s']:.2f} / {slow['rows_per_s']:.2f} (warm-up, compiling included: "
                f"{fast['warm_up_seconds']:.0f} s / {slow['warm_up_seconds']:.0f} s); mean loss "
                f"{fast_losses.mean():.3f} / {slow_losses.mean():.3f}, largest gap in a step {loss_gap:.3f} "
                f"(step-to-step spread of the loss: {slow_losses.std():.3f})",
                "",
                f"{speedup:.1f}x",
                f"{_memory(r[f'train_{stage}_engine_memory'])} / {_memory(r[f'train_{stage}_naive_memory'])}",
                f">= {train_target}x naive: {_met(speedup >= train_target)}",
            )
        )
    print("\n| measurement | value | engine / bound | speed-up over naive | peak mem. GB | target |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nwritten to {args.out}")


def _extrapolated(part: dict, work: dict) -> str:
    return ", extrapolated" if part["rows"] < work["rows"] else ""


def _targets(run: Path, engine_dtype: str) -> tuple[float, float | None, float]:
    """(most engine / bound, least naive / engine for scoring, least for training): issue #5's for the
    embedded LLM in bf16, issue #45's in float32 (a CPU without native bf16) and issue #41's for another
    LLM (the 1.5B model); neither of the last two sets a scoring speed-up."""
    llm = read_run_config(run)["config"]["llm"]
    return (1.3, 6.0, 3.0) if llm == "smollm2-135m" and engine_dtype == "bf16" else (1.5, None, 3.0)


def _memory(result: dict) -> str:
    """Peak resident memory, and the GPU's peak allocation where the part ran on one (GB)."""
    gpu = f" (GPU {result['peak_gpu_gb']:.1f})" if "peak_gpu_gb" in result else ""
    return f"{result['peak_rss_gb']:.1f}{gpu}"


def _met(condition: bool) -> str:
    return "met" if condition else "NOT met"


def _rounded(values: dict) -> dict:
    return {k: round(v) for k, v in values.items()}


def _machine(device: str) -> str:
    on_gpu = device != "cpu" and torch.cuda.is_available()
    gpu = f"{torch.cuda.get_device_name()}, " if on_gpu else ""
    return f"{gpu}{cpu_kind()}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
