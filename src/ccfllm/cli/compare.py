"""`ccfllm compare` and `ccfllm report`: the paper's tables from a plan of runs."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import (
    CCF_PRESETS,
    ccf_config,
    parse_overrides,
)
from ..data import load_collm_split, resolve_data_dir
from ..errors import CCFLLMError
from .base import (
    CF_HISTORY,
    DATA_OPTION_HELP,
    echo_report,
    main,
)

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
    from ..runner import make_plan, read_results, run_plan

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
    multiple=True,
    help="Results file written by `ccfllm compare` (repeatable: one file a preset).",
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
@click.option(
    "--beside",
    type=click.Choice(sorted(CCF_PRESETS)),
    multiple=True,
    help="Another preset whose runs (in one of the results files) get a column of their own in Tables "
    "2 and 3: say `--preset cpu-1.5b --beside cpu`, the 1.5B LLM beside the embedded one.",
)
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
def report(results, out, preset, data_dir, run_dir, beside, device) -> None:
    """Turn a results file into the paper's tables and figures, beside the paper's figures."""
    from ..recommender import load_run
    from ..report import saved_ccf_llm_run, write_report
    from ..runner import read_results

    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=CF_HISTORY)
    records = [record for path in results for record in read_results(Path(path), dataset)]
    run_dir = Path(run_dir) if run_dir else saved_ccf_llm_run(records, preset)  # load_run refuses a non-run
    inside = (load_run(run_dir, dataset, device=device), run_dir, dataset) if run_dir else None
    echo_report(write_report(records, Path(out), preset, ", ".join(results), inside, tuple(beside)))
