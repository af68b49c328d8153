"""The comparison runner on the tiny data: records with provenance, skips what is recorded, loses at most
the run in flight, shares a CF backbone, and refuses a corrupt or foreign results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ccfllm.experiment
from ccfllm.config import ccf_config
from ccfllm.errors import CCFLLMError, CheckpointError
from ccfllm.experiment import run_ccf_llm
from ccfllm.runner import Planned, make_plan, read_results, run_plan
from conftest import TINY_CCF

TINY = {**TINY_CCF, "train_rows": 32, "fusion_rows": 32, "valid_rows": 32, "test_rows": 64}
PLAN = [Planned("mf", "mf"), Planned("tallrec", "mf"), Planned("collm", "mf"), Planned("collm", "mf", "eq5")]


@pytest.fixture
def settings(tiny_llm_dir):
    return {**TINY, "llm": str(tiny_llm_dir)}


def test_a_plan_runs_once_records_provenance_and_shares_the_backbone(
    tmp_path, tiny_dataset, settings, monkeypatch
):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    records = run_plan(PLAN, tiny_dataset, results, runs, "cpu", settings, progress=False)
    assert [r["key"] for r in records] == [p.key("cpu") for p in PLAN]
    header = json.loads(results.read_text().splitlines()[0])
    assert header == {"format": "ccfllm-results/1", "dataset": tiny_dataset.fingerprint()}
    assert read_results(results, tiny_dataset) == records
    for record in records:
        assert set(record["provenance"]) == {"commit", "command", "machine", "wall_s", "finished"}
        assert 0 <= record["test_auc"] <= 1 and record["preset"] == "cpu"
    assert records[0]["model"] == "mf (CF backbone alone)"
    assert [r["model"] for r in records[1:]] == [
        "TALLRec after stage lora",
        "CoLLM after stage fusion",
        "CoLLM after stage fusion",
    ]
    assert records[2]["test_auc"] != records[3]["test_auc"]  # the eq5 variant is another model
    # one backbone, trained once and read by both CoLLM runs
    assert len(list((runs / "cf").iterdir())) == 1
    (shared,) = (runs / "cf").iterdir()
    for record in records[2:]:
        run_config = json.loads((Path(record["folder"]) / "config.json").read_text())
        assert run_config["cf_checkpoint"] == str(shared.resolve())

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(ccfllm.experiment, "run_ccf_llm", no_training)
    assert run_plan(PLAN, tiny_dataset, results, runs, "cpu", settings, progress=False) == records


def test_an_interrupted_runner_keeps_finished_runs_and_resumes(tmp_path, tiny_dataset, settings, monkeypatch):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    original = ccfllm.experiment.run_ccf_llm

    def stop_at_collm(config, *args, **kwargs):
        if config.method == "collm":
            raise KeyboardInterrupt
        return original(config, *args, **kwargs)

    monkeypatch.setattr(ccfllm.experiment, "run_ccf_llm", stop_at_collm)
    with pytest.raises(KeyboardInterrupt):
        run_plan(PLAN, tiny_dataset, results, runs, "cpu", settings, progress=False)
    kept = read_results(results, tiny_dataset)
    assert [r["method"] for r in kept] == ["mf", "tallrec"]
    assert not list(runs.glob("cpu/collm/**/metrics.json"))  # nothing half-written
    monkeypatch.setattr(ccfllm.experiment, "run_ccf_llm", original)
    resumed = run_plan(PLAN, tiny_dataset, results, runs, "cpu", settings, progress=False)
    assert resumed[:2] == kept and len(resumed) == 4


def test_a_corrupt_or_foreign_results_file_is_refused(tmp_path, tiny_dataset):
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"format": "ccfllm-results/1", "dataset": {}}\n{"key": "cpu/mf/mf/def')
    with pytest.raises(CCFLLMError, match="is not a readable results file"):
        read_results(corrupt, tiny_dataset)
    foreign = tmp_path / "foreign.jsonl"
    other = {**tiny_dataset.fingerprint(), "dataset": "amazon-book", "content": "0123456789abcdef"}
    foreign.write_text(json.dumps({"format": "ccfllm-results/1", "dataset": other}) + "\n")
    with pytest.raises(CCFLLMError, match="holds results on .*amazon-book.* name another --results file"):
        read_results(foreign, tiny_dataset)
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text('{"rows": 3}\n')
    with pytest.raises(CCFLLMError, match="is not a ccfllm results file"):
        read_results(stranger, tiny_dataset)


def test_plans_are_checked_before_anything_runs(tmp_path):
    assert [p.method for p in make_plan("main", [0])] == ["mf", "tallrec", "collm", "ccf-llm", "softprompt"]
    assert len(make_plan("main", [0, 1, 2])) == 15
    table3 = make_plan("table3", [0, 1, 2])
    assert len(table3) == 33
    assert set(make_plan("main", [0, 1, 2])) < set(table3) < set(make_plan("full", [0, 1, 2]))
    assert {(p.method, p.backbone) for p in table3 if p.method in ("collm", "ccf-llm")} == {
        (m, b) for m in ("collm", "ccf-llm") for b in ("mf", "lightgcn", "sasrec")
    }
    with pytest.raises(CCFLLMError, match="unknown variant 'alpha-two'"):
        Planned("ccf-llm", "mf", "alpha-two")
    assert Planned("ccf-llm", "lightgcn+mf").backbones == ["lightgcn", "mf"]
    with pytest.raises(CCFLLMError, match="two different ones joined by"):
        Planned("ccf-llm", "mf+mf")
    with pytest.raises(CCFLLMError, match="are CCF-LLM's alone"):
        Planned("collm", "mf+sasrec")
    with pytest.raises(CCFLLMError, match="a CF backbone alone is itself"):
        Planned("mf", "sasrec")
    plan = tmp_path / "plan.json"
    plan.write_text('[{"method": "ccf-llm", "backbone": "mf", "seed": 3}]')
    assert make_plan(str(plan), []) == [Planned("ccf-llm", "mf", "default", 3)]
    plan.write_text('[{"method": "ccf-llm", "cf": "mf"}]')
    with pytest.raises(CCFLLMError, match="must be a JSON list of"):
        make_plan(str(plan), [])


def test_runs_that_would_train_the_same_stage_one_share_it(tmp_path, tiny_dataset, settings):
    plan = [
        Planned("collm", "mf"),
        Planned("softprompt", "mf"),  # CoLLM's stage 1: text prompt, the same loss
        Planned("ccf-llm", "mf"),  # Eq. 5: another stage 1
        Planned("ccf-llm", "mf", "stage1-only"),  # Table 4's row is CCF-LLM's own stage 1
    ]
    collm, soft, ccf, only = run_plan(
        plan, tiny_dataset, tmp_path / "r.jsonl", tmp_path / "runs", "cpu", settings
    )
    assert (collm["stage1_from"], soft["stage1_from"], ccf["stage1_from"]) == (None, collm["key"], None)
    assert only["stage1_from"] == ccf["key"]
    assert soft["stages"][0]["seconds"] == 0.0 and collm["stages"][0]["seconds"] > 0
    assert soft["stages"][0]["test_auc"] == collm["stages"][0]["test_auc"]
    assert soft["stages"][0]["best_valid_auc"] == collm["stages"][0]["best_valid_auc"]
    # the reused adapter, scored again by the stage-1-only run, gives the donor's stage-1 test AUC exactly
    assert only["test_auc"] == ccf["stages"][0]["test_auc"]


def test_a_donor_that_trained_another_stage_one_is_refused(tmp_path, tiny_dataset, settings):
    (donor,) = run_plan(
        [Planned("tallrec", "mf")], tiny_dataset, tmp_path / "r.jsonl", tmp_path / "runs", "cpu", settings
    )
    config = ccf_config(
        "cpu", **{**settings, "method": "tallrec", "lr_lora": 1e-2, "stage1_from": donor["folder"]}
    )
    with pytest.raises(CheckpointError, match=r"settings that differ: \['lr_lora'\]"):
        run_ccf_llm(config, tiny_dataset, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("setting, other", [("lora_targets", "all-linear"), ("lr_schedule", "cosine")])
def test_a_run_saved_before_a_stage_one_setting_existed_counts_as_its_default(settings, setting, other):
    from ccfllm.config import to_dict
    from ccfllm.schedule import stage1_signature

    config = ccf_config("cpu", **settings)
    saved_before = {k: v for k, v in to_dict(config).items() if k != setting}
    assert stage1_signature(saved_before) == stage1_signature(config)
    assert stage1_signature(ccf_config("cpu", **settings, **{setting: other})) != stage1_signature(config)


def test_the_commit_is_dirty_for_changed_code_but_not_for_the_results_file_appended(tmp_path, monkeypatch):
    import subprocess

    from ccfllm.runner import _git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    results = Path("results.jsonl")
    clean = _git_commit(results)
    assert not clean.endswith("-dirty") and clean != "unknown"
    results.write_text("{}\n{}\n")
    assert _git_commit(results) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _git_commit(results) == clean + "-dirty"


def test_a_zero_shot_run_trains_nothing_and_is_recorded_without_stages(tmp_path, tiny_dataset, settings):
    (zero_shot,) = run_plan(
        [Planned("tallrec", "mf", "zero-shot")], tiny_dataset, tmp_path / "r.jsonl", tmp_path / "runs", "cpu",
        settings, progress=False,
    )  # fmt: skip
    assert zero_shot["stages"] == [] and zero_shot["valid_auc"] is None
    assert 0 <= zero_shot["test_auc"] <= 1


def test_runners_sharing_a_plan_run_each_run_once_and_keep_every_record(tmp_path, tiny_dataset, monkeypatch):
    """Two runners (one per GPU, say) on one plan and one results file: each claims the next run
    under the file's lock; threads here, since flock's lock belongs to each opened file, not the process."""
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    plan = [Planned("collm", "mf", seed=seed) for seed in range(6)]
    ran: list[tuple[str, str]] = []

    def fake_run(planned, *args):
        ran.append((threading.current_thread().name, planned.key("cpu")))
        time.sleep(0.2)  # long enough that the other runner claims meanwhile
        return {"model": "CoLLM", "test_auc": 0.5 + planned.seed / 100, "test_uauc": 0.5, "folder": "x"}

    monkeypatch.setattr("ccfllm.runner._run_one", fake_run)
    runners = [
        threading.Thread(target=run_plan, args=(plan, tiny_dataset, results, runs), name=f"runner{i}")
        for i in range(2)
    ]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    keys = [key for _, key in ran]
    assert sorted(keys) == sorted(p.key("cpu") for p in plan)  # every run once, none twice
    assert {name for name, _ in ran} == {"runner0", "runner1"}  # both took a share
    records = read_results(results, tiny_dataset)
    assert sorted(r["key"] for r in records) == sorted(keys)
    assert {r["key"]: r["test_auc"] for r in records} == {p.key("cpu"): 0.5 + p.seed / 100 for p in plan}
    assert json.loads((tmp_path / "results.jsonl.claims.json").read_text()) == {}


def test_a_claim_left_by_a_runner_that_died_is_taken_over(tmp_path, tiny_dataset, monkeypatch):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    plan = [Planned("collm", "mf"), Planned("tallrec", "mf")]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = {"host": platform.node(), "pid": os.getpid()}
    claims = {plan[0].key("cpu"): {"host": platform.node(), "pid": dead.pid}}
    claims[plan[1].key("cpu")] = alive  # a live runner's claim is left alone
    (tmp_path / "results.jsonl.claims.json").write_text(json.dumps(claims))
    monkeypatch.setattr(
        "ccfllm.runner._run_one",
        lambda planned, *args: {"model": "CoLLM", "test_auc": 0.6, "test_uauc": 0.5, "folder": "x"},
    )
    records = run_plan(plan, tiny_dataset, results, runs)
    assert [r["key"] for r in records] == [plan[0].key("cpu")]
    assert json.loads((tmp_path / "results.jsonl.claims.json").read_text()) == {plan[1].key("cpu"): alive}


def test_an_unreadable_claims_file_is_one_error_and_loses_no_record(tmp_path, tiny_dataset, monkeypatch):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    plan = [Planned("collm", "mf")]
    monkeypatch.setattr(
        "ccfllm.runner._run_one",
        lambda planned, *args: {"model": "CoLLM", "test_auc": 0.6, "test_uauc": 0.5, "folder": "x"},
    )
    (kept,) = run_plan(plan, tiny_dataset, results, runs)
    claims = tmp_path / "results.jsonl.claims.json"
    for broken in ("{not json", '{"cpu/tallrec/mf/default/seed0": {"host": "h"}}'):
        claims.write_text(broken)
        with pytest.raises(CCFLLMError, match="not a readable claims file.*delete it"):
            run_plan([*plan, Planned("tallrec", "mf")], tiny_dataset, results, runs)
        assert read_results(results, tiny_dataset) == [kept]


def test_without_git_the_commit_is_unknown_not_a_traceback(tmp_path, monkeypatch):
    from ccfllm.runner import _git_commit

    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert _git_commit(tmp_path / "results.jsonl") == "unknown"
