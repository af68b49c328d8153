"""The run folder, one format for every run (CCF-LLM and its baselines, A-LLMRec): what it records
about itself and how it is read back.

  config.json    {"format": "ccfllm-run/2", "kind": "ccf-llm" or "allmrec", "config": the run's
                 settings, "dataset": the data's fingerprint, "provenance": package version, git
                 commit, command and date, and the kind's own references (the LLM's fingerprint, the
                 CF checkpoints)}
  metrics.json   the kind's table, training curves and timings
  *.safetensors  the trained weights (which ones, the kind decides)

An interrupted run keeps its finished parts in OUT.partial (partial.py) until the run folder is
written. Folders written before this format are read as they were written: 'ccfllm-run/1' as a
CCF-LLM run and 'ccfllm-allmrec/2' as an A-LLMRec run (the same fields, without provenance).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import to_dict
from .errors import CCFLLMError, CheckpointError
from .io import write_json

FORMAT = "ccfllm-run/2"
CCF_LLM, ALLMREC = "ccf-llm", "allmrec"
OLD_FORMATS = {"ccfllm-run/1": CCF_LLM, "ccfllm-allmrec/2": ALLMREC}  # read, no longer written
RETRAIN = {CCF_LLM: "ccfllm train", ALLMREC: "ccfllm allmrec train"}


def write_run_record(folder: Path, kind: str, config, dataset, **fields) -> None:
    """config.json of a finished run of `kind`: its settings, data, provenance and `fields`."""
    record = {
        "format": FORMAT,
        "kind": kind,
        "config": to_dict(config),
        "dataset": dataset.fingerprint(),
        "provenance": provenance(),
        **fields,
    }
    write_json(folder / "config.json", record)


def write_metrics(folder: Path, metrics: dict) -> None:
    write_json(folder / "metrics.json", metrics)


def read_metrics(folder: Path, missing_ok: bool = False) -> dict:
    """metrics.json of a run (or {} where `missing_ok` and the run has none)."""
    path = Path(folder) / "metrics.json"
    if missing_ok and not path.is_file():
        return {}
    return json.loads(require_file(path).read_text())


def read_run_record(folder: Path, kind: str) -> dict:
    """config.json of a run of `kind`, in this format or an old one; refuse a missing, unreadable or
    foreign record with one CheckpointError."""
    path = require_file(folder / "config.json")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
    found = record_kind(record)
    if found != kind:
        what = f"kind {found!r}" if found else f"format {record.get('format')!r}"
        raise CheckpointError(
            f"{path} is not a {kind} run of this version ({what}, expected {FORMAT!r} of kind {kind!r}); "
            f"train it again with `{RETRAIN[kind]}`."
        )
    return record


def record_kind(record: dict) -> str | None:
    """The kind of run a config.json record describes, or None where it is no run this version reads."""
    if not isinstance(record, dict):
        return None
    if record.get("format") == FORMAT:
        return record.get("kind")
    return OLD_FORMATS.get(record.get("format"))


def run_kind(folder: Path) -> str | None:
    """The kind of the run saved in `folder` (None for a record of no kind this version reads); a
    folder that holds no run record is refused."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise CCFLLMError(f"{folder} is not a folder: pass the run folder `ccfllm train` wrote.")
    if not path.is_file():
        raise CCFLLMError(f"{folder} holds no config.json: it is not a finished ccfllm run.")
    try:
        return record_kind(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise CCFLLMError(f"{path} is not a ccfllm run record ({exc}).") from exc


def require_file(path: Path) -> Path:
    """`path`, or one CheckpointError where a run folder (or a finished part) lacks it."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the run folder is incomplete. Retrain the run or restore the file."
        )
    return path


def provenance() -> dict:
    """What made the run: the package's version, the git commit of its source (None outside a git
    checkout), the command line and the date (UTC)."""
    return {
        "version": __version__,
        "commit": _git_commit(),
        "command": shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    return git_output("rev-parse", "HEAD", cwd=Path(__file__).resolve().parent) or None


def git_output(*args: str, cwd: Path | None = None) -> str:
    """What `git ARGS` prints, less its last newline; "" where git is missing, hangs or fails."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.rstrip("\n") if done.returncode == 0 else ""  # porcelain lines start with a space
