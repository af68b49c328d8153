"""CCF-LLM trained for a few steps on the tiny data with a tiny Llama: what each stage trains, that the
loss falls, that a saved run reloads to the same scores, and the cold-start policy at predict time."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from ccfllm.config import ccf_config
from ccfllm.data.dataset import without_latest_train_rows
from ccfllm.engine import score_rows
from ccfllm.errors import CCFLLMError, CheckpointError
from ccfllm.experiment import run_ccf_llm
from ccfllm.llm import load_llm
from ccfllm.loop import Update
from ccfllm.methods.ccf_llm import CFFeatures, ccf_loss, click_score
from ccfllm.metrics import auc
from ccfllm.partial import partial_folder
from ccfllm.prediction import predict_rows
from ccfllm.recommender import build_recommender, evaluate_run, load_run
from ccfllm.train import (
    Stage,
    learning_rate_schedule,
    loss_for,
    loss_scaler,
    train_stage,
    trainable_parameters,
    training_step,
)
from conftest import TINY_CCF, one_label_flipped, stopping_on_call


def tiny_ccf_config(llm_dir, **overrides):
    settings = dict(llm=str(llm_dir), **TINY_CCF)
    return ccf_config("cpu", **{**settings, **overrides})


@pytest.fixture
def recommender(tiny_llm_dir, tiny_dataset, backbone):
    torch.manual_seed(0)
    config = tiny_ccf_config(tiny_llm_dir)
    return build_recommender(
        config, tiny_dataset, backbone, load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    )


def train_batch(recommender, dataset, rows=slice(0, 32), with_cf=True):
    train = dataset.train
    prompts = recommender.hybrid_prompts if with_cf else recommender.text_prompts
    return prompts.batch(train.uid[rows], train.iid[rows], train.history[rows], train.label[rows])


def names(parameters_of, model) -> set[str]:
    chosen = {id(p) for p in parameters_of}
    return {
        name.split(".")[0] + ("/lora" if "lora_" in name else "")
        for name, p in model.named_parameters()
        if id(p) in chosen
    }


def test_each_stage_trains_only_its_parameters(recommender):
    model = recommender.model
    assert names(trainable_parameters(model, Stage.LORA, tune_cf=False), model) == {"llm/lora"}
    assert names(trainable_parameters(model, Stage.FUSION, tune_cf=False), model) == {"alignment", "gate"}
    assert names(trainable_parameters(model, Stage.FUSION, tune_cf=True), model) == {
        "alignment",
        "gate",
        "cf",
    }
    assert names(trainable_parameters(model, Stage.ALL, tune_cf=False), model) == {
        "alignment",
        "gate",
        "llm/lora",
    }


@pytest.mark.parametrize("stage", [Stage.LORA, Stage.FUSION])
def test_a_few_steps_lower_the_loss_and_touch_nothing_else(recommender, tiny_dataset, stage):
    model, batch = recommender.model, train_batch(recommender, tiny_dataset)
    parameters = trainable_parameters(model, stage, tune_cf=False)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimiser = torch.optim.AdamW(parameters, lr=5e-2)
    losses, aucs = [], []
    for _ in range(25):
        log_p_yes, log_p_no, _ = model(batch)
        loss = ccf_loss(log_p_yes, log_p_no, batch.label, k=2.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        aucs.append(auc(batch.label.numpy(), click_score(log_p_yes, log_p_no).detach().numpy()))
    # the batch's labels follow taste groups that both the titles and the CF embeddings reveal
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert aucs[-1] > 0.6 and aucs[-1] > aucs[0] + 0.2, aucs
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_training_rows_read_the_features_given_and_validation_the_models_own(recommender, tiny_dataset):
    model = recommender.model
    own = model.cf
    other = CFFeatures(own.backbone, own.known_users, own.known_items, own.with_bias)
    read = {"own": 0, "other": 0}

    def counting(features, name):
        items = features.items

        def counted(iid):
            read[name] += 1
            return items(iid)

        features.items = counted

    counting(own, "own")
    counting(other, "other")
    config = replace(recommender.config, fusion_rows=16, eval_every=1, patience=5)
    result = train_stage(
        model,
        Stage.FUSION,
        recommender.hybrid_prompts,
        tiny_dataset.train,
        tiny_dataset.valid,
        config,
        progress=False,
        train_features=other,
    )
    assert result.steps == 2 and model.cf is own
    assert read["other"] == 2  # one training batch each step, each reading its items once
    assert read["own"] > 0 and read["own"] % 3 == 0  # the same reads at step 0 and after both steps


def test_the_latest_train_rows_are_split_off_by_time(tiny_dataset):
    earlier, latest = without_latest_train_rows(tiny_dataset, 0.25)
    train = tiny_dataset.train
    assert len(latest) == round(0.25 * len(train)) and len(earlier.train) + len(latest) == len(train)
    assert earlier.train.timestamp.max() <= latest.timestamp.min()
    assert sorted_rows(earlier.train, latest) == sorted_rows(train)
    assert earlier.valid is tiny_dataset.valid and earlier.test is tiny_dataset.test
    with pytest.raises(ValueError, match="between 0 and 1"):
        without_latest_train_rows(tiny_dataset, 1.0)


def sorted_rows(*splits) -> list[tuple[int, int, int]]:
    return sorted(
        (u, i, t)
        for s in splits
        for u, i, t in zip(s.uid.tolist(), s.iid.tolist(), s.timestamp.tolist(), strict=True)
    )


def test_the_cosine_schedule_warms_up_over_3_percent_then_decays_to_zero():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.AdamW([weight], lr=1e-3)
    schedule = learning_rate_schedule(optimiser, "cosine", total_steps=100)  # warm-up: ceil(3.0) steps
    rates = []
    for _ in range(101):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    hand = [1e-3 * s / 3 for s in range(3)] + [
        1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 97)) for s in range(3, 101)
    ]
    np.testing.assert_allclose(rates, hand, rtol=1e-9, atol=1e-15)
    assert rates[3] == pytest.approx(1e-3) and rates[100] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_stage_steps_at_the_learning_rate_its_schedule_gives(
    recommender, tiny_dataset, monkeypatch, schedule
):
    import ccfllm.train as train_module

    rates, real_step = [], train_module.training_step

    def recording_step(model, batch, optimiser, loss, **options):
        rates.append(optimiser.param_groups[0]["lr"])
        return real_step(model, batch, optimiser, loss, **options)

    monkeypatch.setattr(train_module, "training_step", recording_step)
    config = replace(recommender.config, lr_schedule=schedule, patience=100)
    train = tiny_dataset.train
    train_stage(
        recommender.model, Stage.FUSION, recommender.hybrid_prompts, train, tiny_dataset.valid, config, False
    )
    steps = -(-min(config.fusion_rows, len(train)) // config.batch_size)
    assert len(rates) == steps == 8
    if schedule == "constant":
        assert rates == [config.lr_fusion] * steps
    else:  # one warm-up step (ceil(0.03 * 8)), then the cosine over the other 7
        hand = [0.0] + [config.lr_fusion * 0.5 * (1 + math.cos(math.pi * (s - 1) / 7)) for s in range(1, 8)]
        np.testing.assert_allclose(rates, hand, rtol=1e-9)


def test_scores_do_not_depend_on_batch_composition(recommender, tiny_dataset):
    test = tiny_dataset.test
    one_by_one = score_rows(recommender.model, recommender.hybrid_prompts, test, np.arange(24), batch_size=1)
    batched = score_rows(recommender.model, recommender.hybrid_prompts, test, np.arange(24), batch_size=8)
    np.testing.assert_allclose(one_by_one, batched, atol=1e-5)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_llm_dir, tiny_dataset):
    folder = tmp_path_factory.mktemp("runs") / "ccf"
    config = tiny_ccf_config(tiny_llm_dir, cf_model="mf")
    return run_ccf_llm(config, tiny_dataset, folder, progress=False)


def test_a_run_reports_every_stage_and_reloads_to_the_same_scores(saved_run, tiny_dataset):
    models = [row["model"] for row in saved_run.table]
    assert models == [
        "mf (CF backbone alone)",
        "mean-label reference (k=5)",
        "CCF-LLM after stage lora",
        "CCF-LLM after stage fusion",
    ]
    assert sorted(p.name for p in saved_run.folder.iterdir()) == [
        "adapter",
        "cf",
        "config.json",
        "fusion.safetensors",
        "metrics.json",
        "predictions.parquet",
    ]
    reloaded = load_run(saved_run.folder, tiny_dataset, device="cpu")
    test_metrics = evaluate_run(reloaded, tiny_dataset, ("test",), progress=False)["test"]
    assert test_metrics["auc"] == saved_run.table[-1]["test_auc"]  # exactly
    assert test_metrics["uauc"] == saved_run.table[-1]["test_uauc"]


def test_a_run_saves_the_final_models_gap_to_its_backbone_with_a_paired_interval(saved_run):
    (row,) = saved_run.significance
    assert (row["model"], row["versus"]) == ("CCF-LLM after stage fusion", "mf (CF backbone alone)")
    final, backbone = saved_run.table[-1], saved_run.table[0]
    assert row["auc"]["difference"] == final["test_auc"] - backbone["test_auc"]  # exactly
    assert row["uauc"]["difference"] == final["test_uauc"] - backbone["test_uauc"]
    for name in ("auc", "uauc"):
        assert row[name]["low"] <= row[name]["difference"] <= row[name]["high"]
    assert json.loads((saved_run.folder / "metrics.json").read_text())["significance"] == [row]


def test_a_run_with_lora_on_every_linear_layer_reloads_to_the_same_scores(
    tmp_path, tiny_llm_dir, tiny_dataset
):
    config = tiny_ccf_config(tiny_llm_dir, cf_model="mf", strategy="stage1-only", lora_targets="all-linear")
    run = run_ccf_llm(config, tiny_dataset, tmp_path / "run", progress=False)
    adapter = json.loads((run.folder / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip
    reloaded = load_run(run.folder, tiny_dataset, device="cpu")
    test_metrics = evaluate_run(reloaded, tiny_dataset, ("test",), progress=False)["test"]
    assert test_metrics["auc"] == run.table[-1]["test_auc"]  # exactly


def test_a_broken_or_foreign_run_is_refused(saved_run, tiny_dataset, tmp_path):
    import shutil

    broken = shutil.copytree(saved_run.folder, tmp_path / "broken")
    (broken / "fusion.safetensors").unlink()
    with pytest.raises(CheckpointError, match="fusion.safetensors is missing"):
        load_run(broken, tiny_dataset, device="cpu")
    foreign = shutil.copytree(saved_run.folder, tmp_path / "foreign")
    record = json.loads((foreign / "config.json").read_text())
    record["llm"]["hidden_size"] = 4096
    (foreign / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="was trained with the LLM"):
        load_run(foreign, tiny_dataset, device="cpu")
    with pytest.raises(CheckpointError, match="was trained on"):
        load_run(saved_run.folder, one_label_flipped(tiny_dataset), device="cpu")


def not_safetensors(path, kind: str) -> None:
    """Put a torch pickle or bytes of garbage where a weights file was."""
    if kind == "pickle":
        torch.save({"alignment.weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(b"\x00\xff" * 40)


@pytest.mark.parametrize("kind", ["pickle", "garbage"])
@pytest.mark.parametrize(
    "weights", ["fusion.safetensors", "adapter/adapter_model.safetensors", "cf/model.safetensors"]
)
def test_a_run_whose_weights_file_is_not_safetensors_is_one_clear_error(
    saved_run, tiny_dataset, tmp_path, weights, kind
):
    import shutil

    broken = shutil.copytree(saved_run.folder, tmp_path / "broken")
    not_safetensors(broken / weights, kind)
    with pytest.raises(CheckpointError, match=f"{weights} is truncated, corrupt or not safetensors"):
        load_run(broken, tiny_dataset, device="cpu")


def test_a_finished_stage_whose_state_is_not_safetensors_is_one_clear_error(
    saved_run, tiny_llm_dir, tiny_dataset, tmp_path
):
    """An interrupted run's finished stage 1, put together by hand from the saved run, with its
    random-number state garbled: --resume says which file, instead of a SafetensorError."""
    import shutil

    from ccfllm.partial import open_partial_folder

    config = tiny_ccf_config(tiny_llm_dir, cf_model="mf")  # saved_run's settings
    out = tmp_path / "ccf"
    work = open_partial_folder(out, config, tiny_dataset, resume=False, overwrite=False)
    shutil.copytree(saved_run.folder / "cf", work / "cf")
    stage = work / "stages" / "1-lora"
    stage.mkdir(parents=True)
    shutil.copytree(saved_run.folder / "adapter", stage / "adapter")
    shutil.copy(saved_run.folder / "fusion.safetensors", stage / "fusion.safetensors")
    not_safetensors(stage / "state.safetensors", "pickle")
    with pytest.raises(CheckpointError, match="state.safetensors is truncated, corrupt or not safetensors"):
        run_ccf_llm(config, tiny_dataset, out, progress=False, resume=True)
    assert not out.exists() and (work / "stages" / "1-lora").is_dir()  # the finished parts are kept


def test_predict_scores_unknown_users_and_new_items_from_text(saved_run, tiny_dataset):
    recommender = load_run(saved_run.folder, tiny_dataset, device="cpu")
    rows = pd.DataFrame({"uid": [1, 999, 1], "iid": [3, 3, 50], "title": ["", "", "Movie 3 (1983)"]})
    scored = predict_rows(recommender, tiny_dataset, rows)
    assert scored["cf"].tolist() == ["user+item", "item only", "user only"]
    assert scored["score"].between(0, 1).all()
    with pytest.raises(CCFLLMError, match=r"Items \[50\] are not in tiny: add a `title` column"):
        predict_rows(recommender, tiny_dataset, rows.drop(columns=["title"]))


def test_an_interrupted_run_resumes_to_the_same_figures(
    saved_run, tiny_llm_dir, tiny_dataset, tmp_path, monkeypatch
):
    import ccfllm.experiment as experiment

    config = tiny_ccf_config(tiny_llm_dir, cf_model="mf")  # saved_run's settings
    out = tmp_path / "ccf"
    train_stage_as_is = experiment.train_stage

    def interrupted_in_stage_2(model, stage, *args, **kwargs):
        if stage == Stage.FUSION:
            raise KeyboardInterrupt
        return train_stage_as_is(model, stage, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_stage", interrupted_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        run_ccf_llm(config, tiny_dataset, out, progress=False)
    monkeypatch.setattr(experiment, "train_stage", train_stage_as_is)
    partial = partial_folder(out)
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["cf", "config.json", "stages"]
    assert [p.name for p in (partial / "stages").iterdir()] == ["1-lora"]

    with pytest.raises(CheckpointError, match="pass --resume to continue it, or --overwrite"):
        run_ccf_llm(config, tiny_dataset, out, progress=False)
    other = tiny_ccf_config(tiny_llm_dir, cf_model="mf", lr_fusion=1e-3)
    with pytest.raises(CheckpointError, match="lr_fusion: 0.005 there, 0.001 now"):
        run_ccf_llm(other, tiny_dataset, out, progress=False, resume=True)

    resumed = run_ccf_llm(config, tiny_dataset, out, progress=False, resume=True)
    assert resumed.table == saved_run.table  # every test figure, to the last digit
    assert [s.curve for s in resumed.stages] == [s.curve for s in saved_run.stages]
    assert not partial.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved_run.folder.iterdir())
    assert json.loads((out / "metrics.json").read_text())["resumed_stages"] == ["lora"]
    scores = [pd.read_parquet(folder / "predictions.parquet").score for folder in (out, saved_run.folder)]
    assert scores[0].equals(scores[1])


def test_a_run_that_fails_before_finishing_anything_leaves_nothing(tiny_llm_dir, tiny_dataset, tmp_path):
    config = tiny_ccf_config(tmp_path / "no-such-llm", cf_model="mf")
    with pytest.raises(CCFLLMError):
        run_ccf_llm(config, tiny_dataset, tmp_path / "run", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_interrupted_inside_a_stage_resumes_from_its_last_validation(
    tiny_llm_dir, tiny_dataset, tmp_path, monkeypatch
):
    import ccfllm.train as train_module

    config = tiny_ccf_config(tiny_llm_dir, cf_model="mf", lr_schedule="cosine")  # 8 steps, validated at 4, 8
    unbroken = run_ccf_llm(config, tiny_dataset, tmp_path / "unbroken", progress=False)
    out, partial = tmp_path / "ccf", partial_folder(tmp_path / "ccf")
    step_as_is, calls = train_module.training_step, []

    monkeypatch.setattr(
        train_module, "training_step", stopping_on_call(step_as_is, 6, calls)
    )  # stage 1, after step 5
    with pytest.raises(KeyboardInterrupt):
        run_ccf_llm(config, tiny_dataset, out, progress=False)
    assert sorted(p.name for p in (partial / "stages").iterdir()) == ["1-lora.progress.safetensors"]

    calls.clear()  # stage 1 goes on from step 4: 4 steps; then stage 2 stops in its 7th
    monkeypatch.setattr(train_module, "training_step", stopping_on_call(step_as_is, 4 + 7, calls))
    with pytest.raises(KeyboardInterrupt):
        run_ccf_llm(config, tiny_dataset, out, progress=False, resume=True)
    assert sorted(p.name for p in (partial / "stages").iterdir()) == [
        "1-lora",
        "2-fusion.progress.safetensors",
    ]

    calls.clear()
    monkeypatch.setattr(train_module, "training_step", stopping_on_call(step_as_is, 0, calls))
    resumed = run_ccf_llm(config, tiny_dataset, out, progress=False, resume=True)
    assert len(calls) == 4  # stage 1 loaded, stage 2's steps 5-8
    assert resumed.table == unbroken.table  # every test figure, to the last digit
    assert [s.curve for s in resumed.stages] == [s.curve for s in unbroken.stages]
    assert not partial.exists()
    scores = [pd.read_parquet(folder / "predictions.parquet").score for folder in (out, unbroken.folder)]
    assert scores[0].equals(scores[1])


@pytest.fixture
def float16_recommender(tiny_llm_dir, tiny_dataset, backbone):
    """The V100 path (`dtype=auto` is float16 on CUDA without bf16), on the CPU: a float16 LLM."""
    torch.manual_seed(0)
    config = tiny_ccf_config(tiny_llm_dir, dtype="float16")
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float16")
    return build_recommender(config, tiny_dataset, backbone, llm)


@pytest.mark.parametrize("stage", [Stage.LORA, Stage.FUSION])
def test_a_float16_llm_trains_with_loss_scaling_on_float32_weights(float16_recommender, tiny_dataset, stage):
    model = float16_recommender.model
    assert next(model.llm.get_base_model().parameters()).dtype == torch.float16
    parameters = trainable_parameters(model, stage, tune_cf=False)
    scaler = loss_scaler(model, parameters)
    assert isinstance(scaler, torch.amp.GradScaler)  # never unscaled float16 training
    assert {p.dtype for p in parameters} == {torch.float32}  # updates are not rounded to float16
    before = [p.detach().clone() for p in parameters]
    optimiser = torch.optim.AdamW(parameters, lr=1e-2)
    batch = train_batch(float16_recommender, tiny_dataset, with_cf=stage is Stage.FUSION)
    losses = [scaled_step(float16_recommender, batch, optimiser, parameters, scaler) for _ in range(4)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, parameters, strict=True))


def test_a_float16_step_whose_scaled_gradients_overflow_is_skipped(float16_recommender, tiny_dataset):
    model = float16_recommender.model
    parameters = trainable_parameters(model, Stage.LORA, tune_cf=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # float16 overflows at 65,504
    before = [p.detach().clone() for p in parameters]
    optimiser = torch.optim.AdamW(parameters, lr=1e-2)
    batch = train_batch(float16_recommender, tiny_dataset, with_cf=False)
    scaled_step(float16_recommender, batch, optimiser, parameters, scaler)
    assert all(torch.equal(b, p) for b, p in zip(before, parameters, strict=True))  # the step was skipped
    assert scaler.get_scale() == 2.0**119  # and the scale backed off


def test_float16_trainable_weights_are_refused_with_the_setting_to_change(float16_recommender):
    model = float16_recommender.model
    parameters = trainable_parameters(model, Stage.LORA, tune_cf=False)
    with pytest.raises(CCFLLMError, match="dtype=bfloat16 or dtype=float32"):
        loss_scaler(model, [p.detach().half().requires_grad_() for p in parameters])


def scaled_step(recommender, batch, optimiser, parameters, scaler) -> float:
    """One training step as the loop takes it on a float16 model: its loss scaled by `scaler`."""
    loss = loss_for(recommender.config)
    return training_step(recommender.model, batch, optimiser, loss, update=Update(parameters, scaler=scaler))
