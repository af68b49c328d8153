"""Atomic file writes: a failed run never leaves a half-written file behind. Output places checked before
any work, and weights files read, each with one clear error rather than an OSError's traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CCFLLMError, CheckpointError


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    Works for a file or a directory written at the yielded path. What is renamed into place gets the
    permissions the user's umask gives new files and folders (some writers, safetensors among them,
    create files that only their owner can read).
    """
    final_path = Path(final_path)
    tmp_dir = _temporary_folder_beside(final_path)
    tmp_path = tmp_dir / final_path.name
    try:
        yield tmp_path
        _umask_permissions(tmp_path)
        if final_path.is_dir():
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; other processes taking the
    same lock wait. flock(2) from the standard library: the lock goes with the process, so one that
    dies, however it dies, holds nothing."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_folder(folder: str | os.PathLike) -> Path:
    """`mkdir -p folder`, or one error naming the output path that cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(folder, exc) from exc
    return folder


def check_writable(final_path: str | os.PathLike) -> None:
    """Raise now where `final_path` could not be written later (its folder cannot be made, or is not
    writable), so that a long run never ends by refusing to save. Leaves nothing behind: the folders it
    had to create to try are removed again."""
    final_path = Path(final_path)
    missing = [p for p in [final_path.parent, *final_path.parent.parents] if not p.exists()]
    try:
        _temporary_folder_beside(final_path).rmdir()
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _temporary_folder_beside(final_path: Path) -> Path:
    """A fresh hidden folder in `final_path`'s folder (made if missing), to write in and rename from."""
    make_folder(final_path.parent)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", dir=final_path.parent))
    except OSError as exc:
        raise _cannot_write(final_path.parent, exc) from exc


def _cannot_write(folder: Path, exc: OSError) -> CCFLLMError:
    blocking = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # mkdir says only "File exists"
        reason = f"{blocking} is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(folder):
            reason += f" ({exc.filename})"
    return CCFLLMError(f"Cannot write to {folder}: {reason}. Choose another output path.")


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """The tensors of a weights file a run or backbone folder holds, or one CheckpointError where it is
    missing, truncated, or not safetensors (a torch pickle in its place is refused, never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the folder is incomplete. Retrain or restore it.")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable_weights(path, exc) from exc


def unreadable_weights(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is truncated, corrupt or not safetensors ({exc}); retrain or re-copy it.")


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
