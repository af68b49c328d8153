"""The `ccfllm` group and what its commands share: options, errors as one line, SIGTERM, run folders."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pandas as pd

from ..config import (
    parse_overrides,
)
from ..data import DATA_ENV
from ..device import keep_freed_memory
from ..errors import CCFLLMError

DATA_OPTION_HELP = f"CoLLM-format dataset folder (default: ${DATA_ENV}, else ../shared/data/ml-1m-collm)."

COMPILE_SCORING_OPTION = click.option(
    "--compile-scoring/--no-compile-scoring",
    "compile_scoring",
    default=None,
    help="Score with each Llama layer compiled, or not (default: as the run was trained). Compiling "
    "costs 15-40 s once per process on CPU: for a few rows, --no-compile-scoring is quicker.",
)
RESUME_OPTION = click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run of the same settings in OUT.partial from its last finished part "
    "(inside a stage, from the state it last saved there).",
)
SPLITS_OPTION = click.option(
    "--split",
    "splits",
    multiple=True,
    type=click.Choice(["train", "valid", "test"]),
    help="Split(s) to score (default: valid and test).",
)


def training_run_options(command):
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


def settings_epilog(config_class: type, defaults: str) -> str:
    lines = ["\b", f"Settings for --set KEY=VALUE (defaults: {defaults}):"]
    for field in dataclasses.fields(config_class):
        lines.append(f"  {field.name:<15} {field.metadata['help']}")
    return "\n".join(lines)


CF_HISTORY = 10  # rows are loaded with CoLLM's 10 most recent likes; prompts may show fewer


def echo_report(path: Path) -> None:
    click.echo(path.read_text())
    click.echo(f"written to {path}")


def read_rows(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CCFLLMError(
            f"Cannot read {path} as {'CSV' if path.suffix.lower() == '.csv' else 'Parquet'}: {exc}"
        ) from exc


def setting_overrides(settings: tuple[str, ...], seed: int | None) -> dict:
    """--set KEY=VALUE pairs, with --seed on top when given."""
    overrides = parse_overrides(settings)
    if seed is not None:
        overrides["seed"] = seed
    return overrides


@contextlib.contextmanager
def saying_where_finished_parts_wait(out: Path, say: bool = True) -> Iterator[None]:
    """On Ctrl-C, SIGTERM or an error inside the block, say where the run's finished parts wait, unless
    they were there before and the run was refused before any work (its error names the folder).
    Only where `say` (rank 0 of a data-parallel run, which keeps the parts)."""
    from ..partial import partial_folder

    kept = partial_folder(out)
    was_kept = kept.is_dir()
    try:
        yield
    except BaseException as exc:
        refused_before_work = isinstance(exc, CCFLLMError) and was_kept
        if say and kept.is_dir() and not refused_before_work:
            click.echo(f"\nstopped: the finished parts are in {kept}; --resume continues.", err=True)
        raise


def unused_run_folder(out: str | Path, overwrite: bool, check: bool = True) -> Path:
    """Checked before any training, so a long run never ends by refusing to save; by one process
    only (`check`) in a data-parallel run, whose ranks would race making and removing the test folder."""
    from ..io import check_writable

    out = Path(out)
    if out.exists() and not overwrite:
        raise CCFLLMError(f"{out} already exists; choose another --out or pass --overwrite.")
    if check:
        check_writable(out)
    return out


def echo_metrics(metrics: dict) -> None:
    click.echo(f"{'split':<6} {'AUC':>7} {'UAUC':>7}")
    for name, values in metrics.items():
        click.echo(f"{name:<6} {values['auc']:>7.4f} {values['uauc']:>7.4f}")
