"""CF backbones: each learns the tiny data's taste groups; checkpoints round-trip; bad names are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccfllm.cf import CF_MODELS, CFModel, cf_model_class, register_cf_model
from ccfllm.cf.checkpoint import load_cf, load_embeddings, save_cf
from ccfllm.cf.train import evaluate_cf, predict_split, train_cf
from ccfllm.config import ccf_config, cf_config, parse_overrides
from ccfllm.errors import CCFLLMError, CheckpointError
from conftest import one_label_flipped, renamed

BACKBONES = ("mf", "lightgcn", "sasrec")


def tiny_config(model: str, **overrides):
    settings = dict(
        dim=16,
        lr=1e-2,
        batch_size=128,
        max_epochs=12,
        patience=12,
        max_history=5,
        dropout=0.1,
        weight_decay=1e-4,
        bias_decay=1e-4,
    )  # the tiny data is all interaction, no biases
    return cf_config(model, **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_dataset):
    return {model: train_cf(tiny_config(model), tiny_dataset, progress=False) for model in BACKBONES}


@pytest.mark.parametrize("model", BACKBONES)
def test_each_backbone_learns_the_taste_groups(model, tiny_dataset, trained):
    untrained = cf_model_class(model).build(tiny_config(model), tiny_dataset)
    before = evaluate_cf(untrained, tiny_dataset)["test"]["auc"]
    after = evaluate_cf(trained[model].model, tiny_dataset)["test"]
    # likes follow the groups with p = 0.85 / 0.15, so a perfect model reaches an AUC of about 0.85
    assert abs(before - 0.5) < 0.12
    assert after["auc"] > 0.75 and after["uauc"] > 0.7, after
    assert trained[model].valid_auc == pytest.approx(
        evaluate_cf(trained[model].model, tiny_dataset)["valid"]["auc"]
    )


def test_training_is_reproducible_from_the_seed(tiny_dataset):
    first, second, other = (
        predict_split(
            train_cf(tiny_config("sasrec", max_epochs=2, seed=s), tiny_dataset, progress=False).model,
            tiny_dataset.test,
        )
        for s in (3, 3, 4)
    )
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_early_stopping_keeps_the_best_epoch(tiny_dataset):
    result = train_cf(tiny_config("mf", lr=0.3, max_epochs=30, patience=2), tiny_dataset, progress=False)
    aucs = [e["valid_auc"] for e in result.epochs]
    assert len(aucs) == result.best_epoch + 3  # stopped two epochs after the best
    assert result.valid_auc == max(aucs)


@pytest.mark.parametrize("model", BACKBONES)
def test_checkpoint_round_trip_and_embedding_export(model, tiny_dataset, trained, tmp_path):
    original = trained[model].model
    folder = save_cf(original, tiny_dataset, tmp_path / model, {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "embeddings.safetensors",
        "metrics.json",
        "model.safetensors",
    ]
    reloaded = load_cf(folder, dataset=tiny_dataset, expect_model=model, expect_dim=16, device="cpu")
    np.testing.assert_array_equal(
        predict_split(reloaded, tiny_dataset.test), predict_split(original, tiny_dataset.test)
    )

    tables = load_embeddings(folder)
    assert tables["user"].shape == (49, 16) and tables["item"].shape == (41, 16)
    assert not tables["user_in_train"][0] and tables["user"][0].abs().sum() == 0  # padding id: zero row
    items = torch.arange(41)
    with torch.no_grad():
        exported = original.item_embedding(items)[tables["item_in_train"]]
    torch.testing.assert_close(tables["item"][tables["item_in_train"]], exported)
    # the exported tables and biases give back the model's own logits for warm rows
    test = tiny_dataset.test
    rows = np.flatnonzero(test.warm)
    uid, iid, history = (torch.tensor(column[rows]) for column in (test.uid, test.iid, test.history))
    if model != "sasrec":  # SASRec's user vector depends on the row's own history, not on the user alone
        logits = (tables["user"][uid] * tables["item"][iid]).sum(-1)
        logits += tables["user_bias"][uid] + tables["item_bias"][iid] + tables["global_bias"]
        with torch.no_grad():
            torch.testing.assert_close(logits, original(uid, iid, history), rtol=1e-5, atol=1e-5)
    assert json.loads((folder / "metrics.json").read_text()) == {"note": "test"}


def test_checkpoint_from_another_model_dimension_or_dataset_is_refused(tiny_dataset, trained, tmp_path):
    folder = save_cf(trained["mf"].model, tiny_dataset, tmp_path / "mf", {})
    with pytest.raises(CheckpointError, match="holds a mf backbone, not the sasrec"):
        load_cf(folder, expect_model="sasrec")
    with pytest.raises(CheckpointError, match="dimension 16, but 128"):
        load_cf(folder, expect_dim=128)
    with pytest.raises(CheckpointError, match="was trained on"):
        load_cf(folder, dataset=one_label_flipped(tiny_dataset))
    assert load_cf(folder, dataset=renamed(tiny_dataset)).config.model == "mf"  # the same rows: loads
    with pytest.raises(CheckpointError, match="already exists"):
        save_cf(trained["mf"].model, tiny_dataset, folder, {})


def test_truncated_or_missing_checkpoint_is_refused(tiny_dataset, trained, tmp_path):
    folder = save_cf(trained["lightgcn"].model, tiny_dataset, tmp_path / "gcn", {})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not safetensors"):
        load_cf(folder)
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not safetensors"):
        load_cf(folder)
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_cf(tmp_path / "nothing-here")


def test_a_failed_save_leaves_nothing_behind(tiny_dataset, trained, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ccfllm.cf.checkpoint.export_embeddings", broken)
    with pytest.raises(OSError, match="disk full"):
        save_cf(trained["mf"].model, tiny_dataset, tmp_path / "run", {})
    assert list(tmp_path.iterdir()) == []


def test_registry_refuses_duplicates_and_bad_names():
    class Again(CFModel):
        name = "mf"

    class BadName(CFModel):
        name = "Not-A-Name"

    with pytest.raises(ValueError, match="already registered"):
        register_cf_model(Again)
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_cf_model(BadName)
    assert sorted(CF_MODELS) == ["lightgcn", "mf", "sasrec"]
    with pytest.raises(CCFLLMError, match="Unknown CF backbone 'bpr'"):
        cf_model_class("bpr")


def test_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(CCFLLMError, match="Did you mean 'weight_decay'"):
        cf_config("mf", weight_decy=0.1)
    with pytest.raises(CCFLLMError, match="needs a whole number, got 'many'"):
        cf_config("mf", **parse_overrides(["dim=many"]))
    with pytest.raises(CCFLLMError, match="'lr' needs a number, got 'fast'"):
        cf_config("mf", **parse_overrides(["lr=fast"]))
    with pytest.raises(CCFLLMError, match="'compile_training' needs true or false, got 'maybe'"):
        ccf_config("cpu", **parse_overrides(["compile_training=maybe"]))
    with pytest.raises(CCFLLMError, match="dropout must be in"):
        cf_config("sasrec", dropout=1.5)
    with pytest.raises(CCFLLMError, match="not of the form key=value"):
        parse_overrides(["dim"])
    config = cf_config("lightgcn", **parse_overrides(["dim=32", "lr=0.01", "n-layers=3"]))
    assert (config.dim, config.lr, config.n_layers) == (32, 0.01, 3)
