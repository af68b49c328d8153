"""`ccfllm train`, `evaluate`, `predict`, `serve`: CCF-LLM and its baselines, from data to a served run."""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from ..config import (
    CCF_PRESETS,
    PRESET_MINUTES,
    CCFConfig,
    ccf_config,
    preset_for_this_machine,
)
from ..data import load_collm_split, resolve_data_dir
from ..device import cpu_kind
from ..errors import CCFLLMError
from .base import (
    CF_HISTORY,
    COMPILE_SCORING_OPTION,
    DATA_OPTION_HELP,
    RESUME_OPTION,
    SPLITS_OPTION,
    echo_metrics,
    main,
    read_rows,
    saying_where_finished_parts_wait,
    setting_overrides,
    settings_epilog,
    training_run_options,
    unused_run_folder,
)

# -- CCF-LLM -------------------------------------------------------------------------------------


@main.command("train", epilog=settings_epilog(CCFConfig, "the preset"))
@click.option(
    "--preset",
    type=click.Choice(sorted(CCF_PRESETS)),
    default="cpu",
    show_default=True,
    help="cpu: the quick start sized to this machine: where the CPU has native bf16 (AVX-512 bf16, AMX) "
    "the full test split in about 15 minutes on 2 cores; where it computes in float32 (AVX2) it means "
    "cpu-fp32, fewer rows and a seeded test sample; cpu-1.5b: the cpu preset with the installable "
    "Qwen2.5 1.5B (hours on 2 cores); paper: section 4.1's settings.",
)
@click.option(
    "--method",
    default="ccf-llm",
    show_default=True,
    # checked by ccf_config against the registry, which this module leaves unimported (it loads the LLM code)
    help="CCF-LLM, or a baseline run on the same data, LLM and loop (the `method` setting names them).",
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/METHOD/BACKBONE-PRESET-seedSEED).",
)
@click.option(
    "--seed", type=int, default=None, help="Seed for sampling, initialisation and data order (default 0)."
)
@RESUME_OPTION
@training_run_options
def ccf_train(preset, method, data_dir, out, seed, resume, settings, overwrite, quiet) -> None:
    """Train CCF-LLM (or a baseline) end to end: CF backbone, stage 1 (LoRA), stage 2 (ALG + GATE);
    test after each. Until it ends, the run keeps each finished part (and a training stage's state at
    its last validation) in OUT.partial: rerun an interrupted run with --resume to continue it."""
    from ..distributed import current_world
    from ..experiment import run_ccf_llm
    from ..metrics import Difference

    overrides = {"method": method, **setting_overrides(settings, seed)}
    asked, preset = (
        preset,
        preset_for_this_machine(preset, overrides.get("device", "auto"), overrides.get("dtype", "auto")),
    )
    config = ccf_config(preset, **overrides)
    default_out = f"runs/{config.method}/{config.cf_model}-{preset}-seed{config.seed}"
    world = current_world(config.device)  # under `accelerate launch` or torchrun: this process's rank
    out = unused_run_folder(out or default_out, overwrite, check=world.is_main)  # a bad --out fails first
    if world.is_main:
        click.echo(_what_this_run_is(asked, preset, config))
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    with saying_where_finished_parts_wait(out, world.is_main):
        result = run_ccf_llm(config, dataset, out, overwrite=overwrite, progress=not quiet, resume=resume)
    if not world.is_main:  # rank 0 prints the run's table
        return
    minutes = result.seconds / 60
    click.echo(
        f"\n{config.method} ({config.cf_model}, {preset} preset) on {dataset.name}: {minutes:.1f} min; {out}"
    )
    click.echo("| model | test AUC | test UAUC |\n|---|---|---|")
    for row in result.table:
        click.echo(f"| {row['model']} | {row['test_auc']:.4f} | {row['test_uauc']:.4f} |")
    for row in result.significance:  # the final model minus each backbone, 95% paired bootstrap
        auc, uauc = (Difference(**row[name]).text() for name in ("auc", "uauc"))
        click.echo(f"| Δ vs {row['versus']} [95% interval, users resampled] | {auc} | {uauc} |")
    if config.test_rows:
        click.echo(_sampled_test_line(out, len(dataset.test)))


def _what_this_run_is(asked: str, preset: str, config) -> str:
    """The run's first line: the CPU found, the preset it chose and why, and how long it should take."""
    chosen = f"the {preset} preset" + (f" (what `{asked}` means on this CPU)" if asked != preset else "")
    took = f"; measured: {PRESET_MINUTES[preset]}" if preset in PRESET_MINUTES else ""
    lines = [f"{cpu_kind()}: {chosen}{took}."]
    if preset == "cpu-fp32":
        lines.append(
            "Without native bf16 the LLM computes in float32 here, several times slower than in bf16 on a "
            f"CPU that has it, so this run trains on "
            f"{config.train_rows} + {config.fusion_rows} rows and scores a seeded sample of "
            f"{config.test_rows} test rows (its AUC is printed with a 95% interval); "
            "`--preset cpu-bf16` runs the full quick start."
        )
    return "\n".join(lines)


def _sampled_test_line(out: Path, population: int) -> str:
    """What a sampled test split can say: the final model's AUC and UAUC with 95% intervals over users."""
    from ..metrics import auc, bootstrap_intervals, uauc

    rows = pd.read_parquet(Path(out) / "predictions.parquet")
    figures = {"AUC": auc(rows.label, rows.score), "UAUC": uauc(rows.uid, rows.label, rows.score)}
    intervals = bootstrap_intervals(rows.label, rows.uid, rows.score)
    said = ", ".join(
        f"{name} {figures[name]:.4f} [{intervals[name.lower()][0]:.4f}, {intervals[name.lower()][1]:.4f}]"
        for name in figures
    )
    return (
        f"Test figures on a seeded sample of {len(rows):,} of the {population:,} test rows (test_rows); "
        f"the final model: {said} (95% intervals, users resampled)."
    )


@main.command("evaluate")
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@SPLITS_OPTION
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@COMPILE_SCORING_OPTION
def ccf_evaluate(run_dir, data_dir, splits, device, compile_scoring) -> None:
    """Reload a saved CCF-LLM run and report AUC / UAUC."""
    from ..recommender import evaluate_run

    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    recommender = _saved_run(run_dir, dataset, device, compile_scoring)
    echo_metrics(evaluate_run(recommender, dataset, splits or ("valid", "test")))


@main.command("predict")
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Parquet or CSV with uid, iid; optional history (list of item ids) and title (for new items).",
)
@click.option(
    "--output", type=click.Path(dir_okay=False), required=True, help="Parquet file for uid, iid, score, cf."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@COMPILE_SCORING_OPTION
def ccf_predict(run_dir, input_path, output, data_dir, device, compile_scoring) -> None:
    """Score (user, item) rows with a saved run. Users or items unseen by the CF backbone are scored
    from text alone; the `cf` column says which side had a CF embedding. A `history` column holds
    liked item ids, oldest first: a list (Parquet) or a string "[1, 2, 3]" or "1 2 3" (CSV); an empty
    cell means the user's liked items in the dataset."""
    from ..api import load
    from ..io import atomic_path

    rows = read_rows(Path(input_path))
    recommender = load(
        run_dir, data=resolve_data_dir(data_dir), device=device, compile_scoring=compile_scoring
    )
    scored = recommender.score(rows, progress=len(rows) > PROGRESS_ROWS)
    with atomic_path(output) as tmp:
        scored.to_parquet(tmp, index=False)
    counts = scored["cf"].value_counts().to_dict()
    click.echo(f"wrote {len(scored)} scores to {output}; CF embedding available for: {counts}")


PROGRESS_ROWS = 256  # predict shows a progress bar from this many rows on


@main.command("serve")
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@click.option(
    "--max-wait-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="How long a request waits for others to share its engine batch.",
)
@click.option(
    "--max-batch-rows",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Rows gathered into one engine call at most (1: every request on its own).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch's CPU threads (default: torch's choice, one per core). On a CPU that other work "
    "shares, fewer threads can be much faster: idle threads wait at every operation's barrier.",
)
@COMPILE_SCORING_OPTION
def serve(
    run_dir, data_dir, host, port, device, max_wait_ms, max_batch_rows, threads, compile_scoring
) -> None:
    """Serve a saved run over HTTP: POST /score, /recommend, /explain (A-LLMRec runs: /rank), GET
    /health, /info; the web page at /, the API's documentation at /docs. Needs the `serve` extra."""
    from ..api import load

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CCFLLMError(
            f"ccfllm serve needs FastAPI and uvicorn: pip install 'ccfllm[serve]' ({exc})."
        ) from exc
    from ..serve import ServiceLimits
    from ..serve import serve as run_server

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    recommender = load(
        run_dir, data=resolve_data_dir(data_dir), device=device, compile_scoring=compile_scoring
    )
    click.echo(f"serving {run_dir} on http://{host}:{port}/ (API documentation: /docs)")
    run_server(
        recommender, host, port, ServiceLimits(max_batch_rows=max_batch_rows, max_wait_s=max_wait_ms / 1000)
    )


def _saved_run(run_dir, dataset, device: str, compile_scoring: bool | None):
    """A saved run, scoring with its layers compiled as it was trained, or as `compile_scoring` says."""
    from ..recommender import load_run

    recommender = load_run(run_dir, dataset, device=device)
    if compile_scoring is not None:
        recommender.model.compile_scoring = compile_scoring
    return recommender
