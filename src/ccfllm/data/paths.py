"""Where the default dataset is looked for, and the one message when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

DATA_ENV = "CCFLLM_DATA"
DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "ml-1m-collm"
REPO_ROOT = Path(__file__).resolve().parents[3]


def default_candidates() -> list[Path]:
    """The shipped ML-1M split beside the working directory or beside the source checkout."""
    candidates = [Path.cwd() / DEFAULT_RELATIVE, REPO_ROOT / DEFAULT_RELATIVE]
    unique = []
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The dataset folder: the explicit flag, else $CCFLLM_DATA, else the default locations."""
    if explicit:
        looked = [Path(explicit)]
        source = "the --data flag"
    elif os.environ.get(DATA_ENV):
        looked = [Path(os.environ[DATA_ENV])]
        source = f"${DATA_ENV}"
    else:
        looked = default_candidates()
        source = "the default locations"
    for candidate in looked:
        if candidate.is_dir():
            return candidate
    where = ", ".join(str(p) for p in looked)
    raise DataError(
        f"No dataset folder found (from {source}; looked in: {where}). Point at a CoLLM-format split "
        f"with --data DIR or {DATA_ENV}=DIR, or build one from raw files with "
        "`ccfllm data convert-movielens` or `ccfllm data convert-amazon`."
    )
