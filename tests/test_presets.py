"""The command line's `cpu` preset is sized to the CPU it finds (issue #45)."""

from __future__ import annotations

import pytest

from ccfllm import device
from ccfllm.config import CCF_PRESETS, ccf_config, preset_for_this_machine


@pytest.mark.parametrize(
    ("native_bf16", "dtype", "expected"),
    [
        (True, "auto", "cpu"),
        (False, "auto", "cpu-fp32"),  # AVX2: float32 is what `auto` computes in
        (True, "float32", "cpu-fp32"),  # float32 asked for on a bf16 CPU costs what it costs on AVX2
        (False, "bfloat16", "cpu"),  # asked for by name: the run is what was asked
    ],
)
def test_cpu_means_the_float32_sizing_where_the_cpu_computes_in_float32(
    monkeypatch, native_bf16, dtype, expected
):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: native_bf16)
    assert preset_for_this_machine("cpu", "cpu", dtype) == expected
    assert preset_for_this_machine("paper", "cpu", dtype) == "paper"  # other presets as they are
    assert preset_for_this_machine("cpu-bf16", "cpu", dtype) == "cpu-bf16"


def test_the_float32_sizing_keeps_the_method_and_samples_the_test_split():
    full, small = ccf_config("cpu-bf16"), ccf_config("cpu-fp32")
    assert ccf_config("cpu") == full
    fp32, cpu = CCF_PRESETS["cpu-fp32"], CCF_PRESETS["cpu"]
    changed = {key for key in fp32 if fp32[key] != cpu.get(key)}
    assert changed == {
        "train_rows",
        "fusion_rows",
        "valid_rows",
        "eval_every",
        "test_rows",
        "compile_scoring",
    }
    for key in ("lr_lora", "lr_fusion", "batch_size", "method", "loss"):
        assert getattr(small, key) == getattr(full, key)
    assert small.test_rows > 0 and full.test_rows == 0


def test_the_first_line_names_the_cpu_the_preset_and_what_a_float32_run_leaves_out(monkeypatch):
    from ccfllm.cli import ccf as cli

    monkeypatch.setattr(cli, "cpu_kind", lambda: "Some CPU, AVX2 (no native bf16: float32), 2 threads")
    said = cli._what_this_run_is("cpu", "cpu-fp32", ccf_config("cpu-fp32")).splitlines()
    assert said[0].startswith("Some CPU, AVX2 (no native bf16: float32), 2 threads: the cpu-fp32 preset")
    assert "what `cpu` means on this CPU" in said[0]
    assert "64 + 384 rows" in said[1] and "320 test rows" in said[1] and "--preset cpu-bf16" in said[1]
    full = cli._what_this_run_is("cpu", "cpu", ccf_config("cpu"))
    assert full == "Some CPU, AVX2 (no native bf16: float32), 2 threads: the cpu preset; measured: 13.7 " + (
        "minutes on a 2-core Intel Xeon with AMX (bf16), the full test split."
    )


def test_a_sampled_test_split_is_printed_with_its_size_and_intervals(tmp_path):
    import numpy as np
    import pandas as pd

    from ccfllm.cli import ccf as cli
    from ccfllm.metrics import auc, bootstrap_intervals

    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"uid": np.repeat(np.arange(20), 6), "label": np.tile([0, 1], 60)})
    rows["score"] = rows.label * 0.3 + rng.random(len(rows))
    rows.to_parquet(tmp_path / "predictions.parquet")
    line = cli._sampled_test_line(tmp_path, 7331)
    low, high = bootstrap_intervals(rows.label, rows.uid, rows.score)["auc"]
    assert line.startswith("Test figures on a seeded sample of 120 of the 7,331 test rows (test_rows)")
    assert f"AUC {auc(rows.label, rows.score):.4f} [{low:.4f}, {high:.4f}]" in line
