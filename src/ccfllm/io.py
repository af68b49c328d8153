"""Atomic file writes: a failed run never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    Works for a file or a directory written at the yielded path. What is renamed into place gets the
    permissions the user's umask gives new files and folders (some writers, safetensors among them,
    create files that only their owner can read).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", dir=final_path.parent))
    tmp_path = tmp_dir / final_path.name
    try:
        yield tmp_path
        _umask_permissions(tmp_path)
        if final_path.is_dir():
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _umask_permissions(path: Path) -> None:
    """Give `path`, and all under it where it is a folder, the modes the umask gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def new_figure(*grid, **subplots_options):
    """A matplotlib (figure, axes) on the file-only Agg backend (no display needed); imported lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, **subplots_options)


def save_png(figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write `figure` to `path` atomically, then free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)
