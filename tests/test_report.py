"""The report on hand-made results: means, spreads, RelaImpr against the right base, the claims checked
on the means, the paper's figures beside them, and a chart."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccfllm.errors import CCFLLMError
from ccfllm.report import saved_ccf_llm_run, write_report


def record(method, backbone, seed, auc, variant="default", preset="cpu"):
    return {
        "key": f"{preset}/{method}/{backbone}/{variant}/seed{seed}",
        "method": method,
        "backbone": backbone,
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "test_auc": auc,
        "test_uauc": auc - 0.05,
        "provenance": {"commit": "abc1234", "machine": "test box", "wall_s": 1800.0},
    }


RECORDS = [
    record("mf", "mf", 0, 0.70),
    record("mf", "mf", 1, 0.72),
    record("collm", "mf", 0, 0.73),
    record("collm", "mf", 1, 0.75),
    record("ccf-llm", "mf", 0, 0.72),
    record("ccf-llm", "mf", 1, 0.74),
    record("tallrec", "mf", 0, 0.60),
    record("softprompt", "mf", 0, 0.55),
    record("ccf-llm", "lightgcn", 0, 0.74),
    record("ccf-llm", "lightgcn", 0, 0.70, variant="stage1-only"),
    record("ccf-llm", "lightgcn", 0, 0.66, variant="alpha-one"),
    record("tallrec", "mf", 0, 0.52, variant="zero-shot"),
    record("ccf-llm", "lightgcn+mf", 0, 0.745),
    record("mf", "mf", 0, 0.99, preset="paper"),  # another preset: not mixed in
]


def test_the_report_gives_means_spreads_relaimpr_and_the_claims(tmp_path):
    text = write_report(RECORDS, tmp_path, "cpu", "results.jsonl").read_text()
    assert "13 finished runs, 6.5 hours" in text and "abc1234" in text
    # MF: 0.71 ± 0.0141 over 2 seeds; CCF-LLM (MF) 0.73: RelaImpr (0.23 / 0.21 - 1) = 9.52%
    assert "| MF | 0.7100 ± 0.0141 (2 seeds) | - | 0.6600 ± 0.0141 (2 seeds) | 0.6482 | - |" in text
    assert "| CCF-LLM (MF) | 0.7300 ± 0.0141 (2 seeds) | 9.52% |" in text
    assert "| CoLLM (MF) | 0.7400 ± 0.0141 (2 seeds) | 14.29% |" in text
    # TallRec against Softprompt: (0.10 / 0.05 - 1) = 100%; the paper's 1.25%
    assert "| TallRec | 0.6000 (1 seed) | 100.00% | 0.5500 (1 seed) | 0.7097 | 1.25% |" in text
    assert "| CoLLM (LightGCN) | not run |" in text
    assert "| CCF-LLM (Best: LightGCN) | 0.7400 (1 seed) | 380.00% |" in text
    assert "- CCF-LLM (MF) > CoLLM (MF): does NOT hold (0.7300 vs 0.7400)" in text
    assert "- CoLLM (MF) > TallRec: holds (0.7400 vs 0.6000)" in text
    assert "- CCF-LLM (MF) > MF: holds (0.7300 vs 0.7100)" in text
    # Table 4 on LightGCN: stage 1 only (0.20 / 0.24 - 1) = -16.67%; the paper's -16.56%
    assert "| Stage 1 Only | 0.7000 (1 seed) | -16.67% | 0.7025 | -16.56% |" in text
    assert "| End-to-end | not run |" in text
    assert "| α = 1 | 0.6600 (1 seed) |" in text
    assert "| Zero-shot, w/o CF | 0.5200 (1 seed) | 0.6184 |" in text
    assert "| Instruct-tuning, w/o CF | 0.6000 (1 seed) | 0.7084 |" in text
    assert "| Zero-shot, w/ CF | not run | 0.6202 |" in text
    assert "| L+M | 0.7450 (1 seed) |" in text and "| M+S | not run |" in text
    assert "| M | 0.7300 ± 0.0141 (2 seeds) |" in text
    assert (tmp_path / "figure3b.png").is_file()
    assert (tmp_path / "figure3a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relaimpr_against_a_base_near_chance_is_not_printed(tmp_path):
    near_chance = [r for r in RECORDS if r["method"] != "softprompt"] + [record("softprompt", "mf", 0, 0.515)]
    text = write_report(near_chance, tmp_path, "cpu", "results.jsonl").read_text()
    assert "| TallRec | 0.6000 (1 seed) | n/a (base 0.5150, near chance) |" in text
    assert "| CCF-LLM (MF) | 0.7300 ± 0.0141 (2 seeds) | 9.52% |" in text


def test_a_report_of_nothing_is_refused(tmp_path):
    with pytest.raises(CCFLLMError, match="holds no runs of the 'paper' preset"):
        write_report(RECORDS[:1], tmp_path, "paper", "results.jsonl")


def test_figure_4_takes_a_recorded_ccf_llm_run_still_on_disk_mf_first(tmp_path):
    def run(backbone, seed, on_disk, variant="default"):
        folder = tmp_path / f"{backbone}-{variant}-{seed}"
        if on_disk:
            folder.mkdir()
            (folder / "config.json").write_text("{}")
        return {**record("ccf-llm", backbone, seed, 0.7, variant=variant), "folder": str(folder)}

    gone_mf = run("mf", 0, on_disk=False)
    sasrec, mf = run("sasrec", 2, on_disk=True), run("mf", 1, on_disk=True)
    ablation, pair = (
        run("lightgcn", 0, on_disk=True, variant="alpha-one"),
        run("lightgcn+mf", 0, on_disk=True),
    )
    assert saved_ccf_llm_run([gone_mf, ablation, pair, sasrec, mf], "cpu") == Path(mf["folder"])
    assert saved_ccf_llm_run([gone_mf, ablation, pair, sasrec], "cpu") == Path(sasrec["folder"])
    assert saved_ccf_llm_run([gone_mf, ablation, pair], "cpu") is None
    assert saved_ccf_llm_run([sasrec], "paper") is None


def test_the_report_gives_each_runs_gap_to_its_backbone_and_to_collm_with_intervals(tmp_path):
    import json

    import numpy as np
    import pandas as pd

    from ccfllm.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    uid, label = np.repeat(np.arange(1, 21), 10), np.tile([0, 1], 100)
    scores = {"ccf-llm": label * 0.5 + rng.random(200), "collm": label * 0.2 + rng.random(200)}
    saved = {"model": "CCF-LLM after stage fusion", "versus": "mf (CF backbone alone)"}
    saved |= {name: {"difference": 0.0123, "low": 0.004, "high": 0.0201} for name in ("auc", "uauc")}

    def run(method, significance):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"significance": significance}))
        frame = pd.DataFrame({"uid": uid, "iid": np.arange(200), "label": label, "score": scores[method]})
        frame.to_parquet(folder / "predictions.parquet", index=False)
        return {**record(method, "mf", 0, 0.7), "folder": str(folder)}

    records = [run("ccf-llm", [saved]), run("collm", []), record("ccf-llm", "sasrec", 0, 0.7)]
    text = write_report(records, tmp_path / "report", "cpu", "results.jsonl").read_text()
    expected = paired_bootstrap(label, uid, scores["ccf-llm"], scores["collm"])
    assert expected["auc"].low > 0  # a gap this clear is not zero
    row = "| CCF-LLM (MF), seed 0 | +0.0123 [+0.0040, +0.0201] | +0.0123 [+0.0040, +0.0201] | "
    assert row + f"{expected['auc'].text()} | {expected['uauc'].text()} |" in text
    assert "| CoLLM (MF), seed 0 | not saved (the run predates the check) |  | - | - |" in text
    assert "| CCF-LLM (SASRec), seed 0 | run folder not on disk |  | no CoLLM run on this backbone" in text


def test_another_presets_runs_get_their_own_column_beside_the_paper(tmp_path):
    larger = [
        record("mf", "mf", 0, 0.70, preset="cpu-1.5b"),
        record("tallrec", "mf", 0, 0.66, preset="cpu-1.5b"),
        record("ccf-llm", "mf", 0, 0.75, preset="cpu-1.5b"),
    ]
    text = write_report(
        RECORDS + larger, tmp_path, "cpu-1.5b", "a.jsonl, b.jsonl", beside=("cpu",)
    ).read_text()
    assert "# CCF-LLM and its baselines: the `cpu-1.5b` preset (qwen2.5-1.5b)" in text
    assert "16 finished runs" in text  # both presets: 13 + 3
    assert "| test AUC, `cpu` (smollm2-135m) | paper AUC |" in text
    # 1.5B CCF-LLM (RelaImpr 0.25 / 0.20 - 1), its UAUC, the cpu preset's 2-seed mean, the paper's
    assert (
        "| CCF-LLM (MF) | 0.7500 (1 seed) | 25.00% | 0.7000 (1 seed) | 0.7300 ± 0.0141 (2 seeds) | 0.7315 |"
        in text
    )
    assert "| TallRec | 0.6600 (1 seed) |  |" in text  # no Softprompt in cpu-1.5b: no RelaImpr
    assert "| Instruct-tuning, w/o CF | 0.6600 (1 seed) | 0.6000 (1 seed) | 0.7084 |" in text
    assert "| CoLLM (MF) | not run | 0.7400 ± 0.0141 (2 seeds) | 0.7295 |" in text
    with pytest.raises(CCFLLMError, match="no runs of the 'paper-x' preset"):
        write_report(larger, tmp_path, "cpu-1.5b", "a.jsonl", beside=("paper-x",))
