"""`ccfllm allmrec`: A-LLMRec on the next-item task."""

from __future__ import annotations

from pathlib import Path

import click

from ..allmrec_report import write_allmrec_report
from ..data import load_collm_split, resolve_data_dir
from ..next_item_config import ALLMREC_PRESETS, AllmrecConfig, allmrec_config
from .base import (
    CF_HISTORY,
    DATA_OPTION_HELP,
    RESUME_OPTION,
    echo_report,
    main,
    saying_where_finished_parts_wait,
    setting_overrides,
    settings_epilog,
    training_run_options,
    unused_run_folder,
)

# -- A-LLMRec --------------------------------------------------------------------------------------


@main.group()
def allmrec() -> None:
    """A-LLMRec on the next-item task: SASRec, alignment with item text, soft prompts into a frozen LLM."""


@allmrec.command("train", epilog=settings_epilog(AllmrecConfig, "the preset"))
@click.option("--preset", type=click.Choice(sorted(ALLMREC_PRESETS)), default="cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/allmrec/VARIANT-PRESET-seedSEED).",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling, initialisation and data order.")
@RESUME_OPTION
@training_run_options
def allmrec_train(preset, data_dir, out, seed, resume, settings, overwrite, quiet) -> None:
    """Train SASRec, A-LLMRec's two stages, and rank the test candidates with each model. Until it ends,
    the run keeps each finished part (and stage 2's state every 5 minutes) in OUT.partial: rerun an
    interrupted run with --resume to continue it."""
    from ..next_item_experiment import run_allmrec

    config = allmrec_config(preset, **setting_overrides(settings, seed))
    out = unused_run_folder(out or f"runs/allmrec/{config.variant}-{preset}-seed{config.seed}", overwrite)
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    with saying_where_finished_parts_wait(out):
        result = run_allmrec(config, dataset, out, overwrite=overwrite, progress=not quiet, resume=resume)
    click.echo(f"\n{config.variant} ({preset} preset) on {dataset.name}: {result.seconds / 60:.1f} min")
    echo_report(write_allmrec_report(Path(out)))


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
    from ..next_item_experiment import evaluate_allmrec, load_allmrec

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
    echo_report(write_allmrec_report(Path(run_dir), Path(out) if out else None))
