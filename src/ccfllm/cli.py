"""The `ccfllm` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pandas as pd

from .allmrec_report import write_allmrec_report
from .config import (
    ALLMREC_PRESETS,
    CCF_PRESETS,
    PRESET_MINUTES,
    AllmrecConfig,
    CCFConfig,
    CFConfig,
    allmrec_config,
    ccf_config,
    cf_config,
    parse_overrides,
    preset_for_this_machine,
    to_dict,
)
from .data import DATA_ENV, convert_amazon, convert_movielens, load_collm_split, resolve_data_dir
from .device import cpu_kind, keep_freed_memory
from .errors import CCFLLMError

DATA_OPTION_HELP = f"CoLLM-format dataset folder (default: ${DATA_ENV}, else ../shared/data/ml-1m-collm)."

_COMPILE_SCORING_OPTION = click.option(
    "--compile-scoring/--no-compile-scoring",
    "compile_scoring",
    default=None,
    help="Score with each Llama layer compiled, or not (default: as the run was trained). Compiling "
    "costs 15-40 s once per process on CPU: for a few rows, --no-compile-scoring is quicker.",
)
_RESUME_OPTION = click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run of the same settings in OUT.partial from its last finished part "
    "(inside a stage, from the state it last saved there).",
)
_SPLITS_OPTION = click.option(
    "--split",
    "splits",
    multiple=True,
    type=click.Choice(["train", "valid", "test"]),
    help="Split(s) to score (default: valid and test).",
)


def _training_run_options(command):
    """--set, --overwrite and --quiet, which every training command takes."""
    options = [
        click.option(
            "--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a setting (repeatable)."
        ),
        click.option("--overwrite", is_flag=True, help="Replace the run folder if it exists."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def unwind_on_sigterm() -> None:
    """A terminated run (kill, a job scheduler's SIGTERM) unwinds like Ctrl-C, so that anything
    half-written beside its place is removed on the way out (`train` keeps its finished parts)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.unraisablehook = _resend_a_lost_sigterm


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


def _resend_a_lost_sigterm(unraisable) -> None:
    """Python ignores an exception raised inside a weakref callback or a __del__ (torch runs many of
    them), so a SIGTERM whose handler ran there would be lost and the run go on: send it again, from
    another thread a moment later, so that it is handled after this hook (where it would be lost
    too) has returned."""
    if isinstance(unraisable.exc_value, SystemExit) and unraisable.exc_value.code == 128 + signal.SIGTERM:
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        again.daemon = True  # never what keeps a finished process alive
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


class FriendlyGroup(click.Group):
    """Turns a CCFLLMError anywhere below into one line on stderr and exit status 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        unwind_on_sigterm()
        try:
            return super().invoke(ctx)
        except CCFLLMError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ccfllm")
def main() -> None:
    """ccfllm: recommendation with LLMs that fuse collaborative-filtering signals with text."""
    keep_freed_memory()


# -- data ----------------------------------------------------------------------------------------


@main.group()
def data() -> None:
    """Inspect a dataset or build one from raw MovieLens / Amazon files."""


@data.command("inspect")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--max-history", default=10, show_default=True, help="Liked items kept per row.")
def data_inspect(data_dir: str | None, max_history: int) -> None:
    """Counts per split: rows, users, items, label balance, cold items and users, history length."""
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=max_history)
    click.echo(f"dataset {dataset.name} ({dataset.domain}) at {dataset.source}")
    click.echo(f"{dataset.n_users - 1} users, {dataset.n_items - 1} items (ids from 1; 0 is padding)")
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        click.echo(dataset.summary().to_string())


@data.command("convert-movielens")
@click.argument("raw_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_movielens(raw_dir: str, out_dir: str, overwrite: bool) -> None:
    """Build CoLLM's ML-1M split from RAW_DIR (ratings.dat, movies.dat) into OUT_DIR."""
    _report_conversion(convert_movielens(raw_dir, out_dir, overwrite=overwrite))


@data.command("convert-amazon")
@click.argument("reviews", type=click.Path(exists=True, dir_okay=False))
@click.argument("meta", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_amazon(reviews: str, meta: str, out_dir: str, overwrite: bool) -> None:
    """Build CoLLM's Amazon-Book split from REVIEWS (Books_5.json[.gz]) and META (meta_Books.json[.gz])."""
    _report_conversion(convert_amazon(reviews, meta, out_dir, overwrite=overwrite))


@data.command("convert-interactions")
@click.argument("interactions", type=click.Path(exists=True, dir_okay=False))
@click.argument("items", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--split",
    "split_kind",
    type=click.Choice(["fractions", "time"]),
    default="fractions",
    show_default=True,
    help="Split by time: the latest fractions of the rows, or at two moments.",
)
@click.option("--valid-fraction", default=0.1, show_default=True, help="With --split fractions.")
@click.option("--test-fraction", default=0.1, show_default=True, help="With --split fractions.")
@click.option("--valid-from", help="With --split time: when valid starts (unix seconds or a date).")
@click.option("--test-from", help="With --split time: when test starts (unix seconds or a date).")
@click.option("--label-threshold", default=4.0, show_default=True, help="label = rating >= this.")
@click.option("--history-length", default=10, show_default=True, help="Liked items kept in each row's his.")
@click.option("--domain", default="movies", show_default=True, help="The prompt's noun: 'movies' or 'books'.")
@click.option("--name", help="The dataset's name (default: OUT_DIR's).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_interactions(
    interactions, items, out_dir, split_kind, valid_fraction, test_fraction, valid_from, test_from,
    label_threshold, history_length, domain, name, overwrite,
) -> None:  # fmt: skip
    """Build a split from your own INTERACTIONS (user, item, rating or label, timestamp) and ITEMS
    (item, title) files, CSV, TSV or Parquet. The folder's format: docs/dataset-format.md."""
    from .data.interactions import SplitRule, convert_interactions

    rule = SplitRule(split_kind, valid_fraction, test_fraction, valid_from, test_from)
    out = convert_interactions(
        interactions, items, out_dir, rule, label_threshold, history_length, domain, name, overwrite
    )
    _report_conversion(out)


def _report_conversion(out_dir: Path) -> None:
    dataset = load_collm_split(out_dir)
    click.echo(f"wrote {out_dir}")
    click.echo(dataset.summary()[["rows", "users", "items", "positive_rate"]].to_string())


# -- cf ------------------------------------------------------------------------------------------


def _settings_epilog(config_class: type, defaults: str) -> str:
    lines = ["\b", f"Settings for --set KEY=VALUE (defaults: {defaults}):"]
    for field in dataclasses.fields(config_class):
        lines.append(f"  {field.name:<15} {field.metadata['help']}")
    return "\n".join(lines)


@main.group()
def cf() -> None:
    """Train and evaluate the collaborative-filtering backbones (MF, LightGCN, SASRec)."""


@cf.command("train", epilog=_settings_epilog(CFConfig, "the backbone's preset"))
@click.option("--model", type=click.Choice(["mf", "lightgcn", "sasrec"]), required=True, help="Backbone.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/cf/MODEL-seedSEED).")
@click.option("--seed", type=int, default=None, help="Seed for initialisation and data order (default 0).")
@_training_run_options
def cf_train(model, data_dir, out, seed, settings, overwrite, quiet) -> None:
    """Train a backbone on train, early-stop on valid AUC, evaluate, save weights and embeddings."""
    from .cf.checkpoint import save_cf
    from .cf.train import evaluate_cf, train_cf

    config = cf_config(model, **_overrides(settings, seed))
    out = _unused_run_folder(out or f"runs/cf/{model}-seed{config.seed}", overwrite)
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=config.max_history)
    result = train_cf(config, dataset, progress=not quiet)
    metrics = evaluate_cf(result.model, dataset)
    record = {
        **metrics,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 2),
        "config": to_dict(config),
    }
    save_cf(result.model, dataset, out, record, overwrite=overwrite)
    click.echo(f"{model}: best epoch {result.best_epoch}, {result.seconds:.1f} s; saved {out}")
    _echo_metrics(metrics)


@cf.command("evaluate")
@click.option(
    "--checkpoint", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@_SPLITS_OPTION
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    help="Also write uid, iid, label, score of the last split to this Parquet file.",
)
def cf_evaluate(checkpoint, data_dir, splits, predictions) -> None:
    """Reload a saved backbone and report AUC / UAUC on the dataset it was trained on."""
    from .cf.checkpoint import load_cf, read_metadata
    from .cf.train import predict_split
    from .io import atomic_path
    from .metrics import split_metrics

    config = json.loads(read_metadata(checkpoint)["config"])
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=config["max_history"])
    model = load_cf(checkpoint, dataset=dataset, device=config["device"])
    metrics = {}
    started = time.perf_counter()
    for name in splits or ("valid", "test"):
        split = dataset.splits[name]
        scores = predict_split(model, split)
        metrics[name] = split_metrics(split.uid, split.label, scores)
    click.echo(f"{config['model']} from {checkpoint} ({time.perf_counter() - started:.1f} s)")
    _echo_metrics(metrics)
    if predictions:
        frame = pd.DataFrame({"uid": split.uid, "iid": split.iid, "label": split.label, "score": scores})
        with atomic_path(predictions) as tmp:
            frame.to_parquet(tmp, index=False)
        click.echo(f"wrote {len(frame)} predictions of {name} to {predictions}")


# -- CCF-LLM -------------------------------------------------------------------------------------

CF_HISTORY = 10  # rows are loaded with CoLLM's 10 most recent likes; prompts may show fewer


@main.command("train", epilog=_settings_epilog(CCFConfig, "the preset"))
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
@_RESUME_OPTION
@_training_run_options
def ccf_train(preset, method, data_dir, out, seed, resume, settings, overwrite, quiet) -> None:
    """Train CCF-LLM (or a baseline) end to end: CF backbone, stage 1 (LoRA), stage 2 (ALG + GATE);
    test after each. Until it ends, the run keeps each finished part (and a training stage's state at
    its last validation) in OUT.partial: rerun an interrupted run with --resume to continue it."""
    from .distributed import current_world
    from .experiment import run_ccf_llm
    from .metrics import Difference

    overrides = {"method": method, **_overrides(settings, seed)}
    asked, preset = (
        preset,
        preset_for_this_machine(preset, overrides.get("device", "auto"), overrides.get("dtype", "auto")),
    )
    config = ccf_config(preset, **overrides)
    default_out = f"runs/{config.method}/{config.cf_model}-{preset}-seed{config.seed}"
    world = current_world(config.device)  # under `accelerate launch` or torchrun: this process's rank
    out = _unused_run_folder(out or default_out, overwrite, check=world.is_main)  # a bad --out fails first
    if world.is_main:
        click.echo(_what_this_run_is(asked, preset, config))
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    with _saying_where_finished_parts_wait(out, world.is_main):
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
    from .metrics import auc, bootstrap_intervals, uauc

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
@_SPLITS_OPTION
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@_COMPILE_SCORING_OPTION
def ccf_evaluate(run_dir, data_dir, splits, device, compile_scoring) -> None:
    """Reload a saved CCF-LLM run and report AUC / UAUC."""
    from .recommender import evaluate_run

    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    recommender = _saved_run(run_dir, dataset, device, compile_scoring)
    _echo_metrics(evaluate_run(recommender, dataset, splits or ("valid", "test")))


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
@_COMPILE_SCORING_OPTION
def ccf_predict(run_dir, input_path, output, data_dir, device, compile_scoring) -> None:
    """Score (user, item) rows with a saved run. Users or items unseen by the CF backbone are scored
    from text alone; the `cf` column says which side had a CF embedding. A `history` column holds
    liked item ids, oldest first: a list (Parquet) or a string "[1, 2, 3]" or "1 2 3" (CSV); an empty
    cell means the user's liked items in the dataset."""
    from .api import load
    from .io import atomic_path

    rows = _read_rows(Path(input_path))
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
@_COMPILE_SCORING_OPTION
def serve(
    run_dir, data_dir, host, port, device, max_wait_ms, max_batch_rows, threads, compile_scoring
) -> None:
    """Serve a saved run over HTTP: POST /score, /recommend, /explain (A-LLMRec runs: /rank), GET
    /health, /info; the web page at /, the API's documentation at /docs. Needs the `serve` extra."""
    from .api import load

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CCFLLMError(
            f"ccfllm serve needs FastAPI and uvicorn: pip install 'ccfllm[serve]' ({exc})."
        ) from exc
    from .serve import ServiceLimits
    from .serve import serve as run_server

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
    from .recommender import load_run

    recommender = load_run(run_dir, dataset, device=device)
    if compile_scoring is not None:
        recommender.model.compile_scoring = compile_scoring
    return recommender


# -- A-LLMRec --------------------------------------------------------------------------------------


@main.group()
def allmrec() -> None:
    """A-LLMRec on the next-item task: SASRec, alignment with item text, soft prompts into a frozen LLM."""


@allmrec.command("train", epilog=_settings_epilog(AllmrecConfig, "the preset"))
@click.option("--preset", type=click.Choice(sorted(ALLMREC_PRESETS)), default="cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/allmrec/VARIANT-PRESET-seedSEED).",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling, initialisation and data order.")
@_RESUME_OPTION
@_training_run_options
def allmrec_train(preset, data_dir, out, seed, resume, settings, overwrite, quiet) -> None:
    """Train SASRec, A-LLMRec's two stages, and rank the test candidates with each model. Until it ends,
    the run keeps each finished part (and stage 2's state every 5 minutes) in OUT.partial: rerun an
    interrupted run with --resume to continue it."""
    from .next_item_experiment import run_allmrec

    config = allmrec_config(preset, **_overrides(settings, seed))
    out = _unused_run_folder(out or f"runs/allmrec/{config.variant}-{preset}-seed{config.seed}", overwrite)
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    with _saying_where_finished_parts_wait(out):
        result = run_allmrec(config, dataset, out, overwrite=overwrite, progress=not quiet, resume=resume)
    click.echo(f"\n{config.variant} ({preset} preset) on {dataset.name}: {result.seconds / 60:.1f} min")
    _echo_report(write_allmrec_report(Path(out)))


@allmrec.command("evaluate")
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--split", type=click.Choice(["valid", "test", "cold_users"]), default="test", show_default=True
)
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
def allmrec_evaluate(run_dir, data_dir, split, device) -> None:
    """Reload a saved A-LLMRec run and rank a split's candidates with A-LLMRec and A-LLMRec(SBERT)."""
    from .next_item_experiment import evaluate_allmrec, load_allmrec

    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    for name, metrics in evaluate_allmrec(load_allmrec(run_dir, dataset, device), split).items():
        click.echo(f"{name:<18} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


@allmrec.command("report")
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--out", type=click.Path(file_okay=False), help="Folder for report.md (default: the run's).")
def allmrec_report(run_dir, out) -> None:
    """Write a finished run's report: its table beside the talk's, the claims, speed, curves."""
    _echo_report(write_allmrec_report(Path(run_dir), Path(out) if out else None))


def _echo_report(path: Path) -> None:
    click.echo(path.read_text())
    click.echo(f"written to {path}")


# -- comparisons ---------------------------------------------------------------------------------


@main.command("compare")
@click.option(
    "--plan",
    default="main",
    show_default=True,
    help="'main' (MF group of Table 3 and the text baselines), 'table3' (Table 3 on every backbone), "
    "'full' (Tables 2-4, Figure 3), "
    "or a JSON file listing {method, backbone, variant, seed} objects.",
)
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of a named plan, comma-separated.")
@click.option("--preset", type=click.Choice(sorted(CCF_PRESETS)), default="cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--results",
    type=click.Path(dir_okay=False),
    default=None,
    help="Results file (JSON Lines; default results/DATASET-PRESET.jsonl). Recorded runs are skipped.",
)
@click.option(
    "--runs",
    type=click.Path(file_okay=False),
    default="runs/compare",
    show_default=True,
    help="Where run folders and shared CF backbones go.",
)
@click.option(
    "--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a setting of every run."
)
@click.option("--dry-run", is_flag=True, help="List the plan and what is already recorded; run nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(plan, seeds, preset, data_dir, results, runs, settings, dry_run, quiet) -> None:
    """Run a plan of comparisons, recording each finished run; rerun to resume where it stopped."""
    from .runner import make_plan, read_results, run_plan

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise CCFLLMError(f"--seeds must be comma-separated integers, got {seeds!r}.") from exc
    planned = make_plan(plan, seed_list)
    overrides = parse_overrides(settings)
    ccf_config(preset, **overrides)  # refuse a bad setting before anything runs
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    results = Path(results or f"results/{dataset.name}-{preset}.jsonl")
    if dry_run:
        done = {record["key"] for record in read_results(results, dataset)}
        for run in planned:
            click.echo(f"{'recorded' if run.key(preset) in done else 'to run  '}  {run.key(preset)}")
        return
    records = run_plan(planned, dataset, results, Path(runs), preset, overrides, progress=not quiet)
    click.echo(f"\n{len(records)} runs recorded in {results}")


@main.command("report")
@click.option(
    "--results",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Results file written by `ccfllm compare`.",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for report.md and PNGs.")
@click.option("--preset", type=click.Choice(sorted(CCF_PRESETS)), default="cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A saved CCF-LLM run for Figure 4 and Table 5 (default: the first recorded one-backbone CCF-LLM run "
    "still on disk, MF first).",
)
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
def report(results, out, preset, data_dir, run_dir, device) -> None:
    """Turn a results file into the paper's tables and figures, beside the paper's figures."""
    from .recommender import load_run
    from .report import saved_ccf_llm_run, write_report
    from .runner import read_results

    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    records = read_results(Path(results), dataset)
    run_dir = Path(run_dir) if run_dir else saved_ccf_llm_run(records, preset)  # load_run refuses a non-run
    inside = (load_run(run_dir, dataset, device=device), run_dir, dataset) if run_dir else None
    _echo_report(write_report(records, Path(out), preset, results, inside))


def _read_rows(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CCFLLMError(
            f"Cannot read {path} as {'CSV' if path.suffix.lower() == '.csv' else 'Parquet'}: {exc}"
        ) from exc


def _overrides(settings: tuple[str, ...], seed: int | None) -> dict:
    """--set KEY=VALUE pairs, with --seed on top when given."""
    overrides = parse_overrides(settings)
    if seed is not None:
        overrides["seed"] = seed
    return overrides


@contextlib.contextmanager
def _saying_where_finished_parts_wait(out: Path, say: bool = True) -> Iterator[None]:
    """On Ctrl-C, SIGTERM or an error inside the block, say where the run's finished parts wait, unless
    they were there before and the run was refused before any work (its error names the folder).
    Only where `say` (rank 0 of a data-parallel run, which keeps the parts)."""
    from .partial import partial_folder

    kept = partial_folder(out)
    was_kept = kept.is_dir()
    try:
        yield
    except BaseException as exc:
        refused_before_work = isinstance(exc, CCFLLMError) and was_kept
        if say and kept.is_dir() and not refused_before_work:
            click.echo(f"\nstopped: the finished parts are in {kept}; --resume continues.", err=True)
        raise


def _unused_run_folder(out: str | Path, overwrite: bool, check: bool = True) -> Path:
    """Checked before any training, so a long run never ends by refusing to save; by one process
    only (`check`) in a data-parallel run, whose ranks would race making and removing the test folder."""
    from .io import check_writable

    out = Path(out)
    if out.exists() and not overwrite:
        raise CCFLLMError(f"{out} already exists; choose another --out or pass --overwrite.")
    if check:
        check_writable(out)
    return out


def _echo_metrics(metrics: dict) -> None:
    click.echo(f"{'split':<6} {'AUC':>7} {'UAUC':>7}")
    for name, values in metrics.items():
        click.echo(f"{name:<6} {values['auc']:>7.4f} {values['uauc']:>7.4f}")


if __name__ == "__main__":
    main()
