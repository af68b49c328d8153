"""A method is one record: a toy method, defined here in one Method and added with one `register` call,
is validated by the config, trains and scores with its own loss and score, saves what its CF source
trains and reloads to the same test AUC; the registry refuses a second registration and unknown names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ccfllm.config import ccf_config
from ccfllm.errors import CCFLLMError
from ccfllm.experiment import run_ccf_llm
from ccfllm.methods import LOSSES, METHODS, Loss, Method, get_method, register
from ccfllm.methods.ccf_llm import Answer, normalised_p_yes
from ccfllm.methods.softprompt import FREE_TABLES
from ccfllm.methods.tallrec import TALLREC
from ccfllm.recommender import evaluate_run, load_run
from conftest import TINY_CCF

CALLS = {"train": 0, "score": 0}  # how often the toy's loss and score ran


def brier_loss(answer: Answer, label: torch.Tensor, k: float) -> torch.Tensor:
    CALLS["train"] += 1
    return ((normalised_p_yes(answer) - label) ** 2).mean()


def counted_score(answer: Answer) -> torch.Tensor:
    CALLS["score"] += 1
    return normalised_p_yes(answer)


# CCF-LLM's fused prompt filled from Softprompt's free tables, trained on a Brier loss: a combination no
# shipped method makes, from one definition.
TOY = Method(
    "toy",
    "Toy",
    prompt="fused",
    cf_source=FREE_TABLES,
    loss=Loss("brier", brier_loss, counted_score),
    strategies=("two-stage",),
    strategy_note="trains its tables in a second stage",
    settings={"fusion": "alpha-scalar"},
)


@pytest.fixture
def toy_registered():
    methods, losses = dict(METHODS), dict(LOSSES)
    register(TOY)
    yield TOY
    METHODS.clear()
    METHODS.update(methods)
    LOSSES.clear()
    LOSSES.update(losses)


def test_the_config_reads_a_registered_toy_methods_record(toy_registered):
    config = ccf_config("cpu", method="toy")
    assert (config.loss, config.strategy, config.fusion) == ("brier", "two-stage", "alpha-scalar")
    with pytest.raises(CCFLLMError, match="toy trains its tables in a second stage"):
        ccf_config("cpu", method="toy", strategy="stage1-only")
    with pytest.raises(CCFLLMError, match="two fused backbones"):
        ccf_config("cpu", method="toy", cf_model2="lightgcn")
    assert ccf_config("cpu", method="collm", loss="brier").loss == "brier"  # a registered loss is a choice


def test_a_toy_method_trains_with_its_own_loss_and_reloads_to_the_same_scores(
    toy_registered, tiny_llm_dir, tiny_dataset, tmp_path
):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), method="toy", **TINY_CCF)
    CALLS.update(train=0, score=0)
    result = run_ccf_llm(config, tiny_dataset, tmp_path / "toy", progress=False)
    assert [row["model"] for row in result.table] == [
        "mean-label reference (k=5)",  # free tables: no backbone trained
        "Toy after stage lora",
        "Toy after stage fusion",
    ]
    steps = sum(stage.steps for stage in result.stages)
    assert CALLS["train"] == steps > 0 and CALLS["score"] > 0
    saved = load_file(result.folder / "fusion.safetensors")
    assert {"cf.user_table.weight", "cf.item_table.weight"} <= set(saved)  # what FREE_TABLES trains
    reloaded = load_run(result.folder, tiny_dataset, device="cpu")
    test = evaluate_run(reloaded, tiny_dataset, ("test",), progress=False)["test"]
    assert test["auc"] == result.table[-1]["test_auc"]


def test_the_registry_refuses_a_second_registration_and_names_the_methods(toy_registered):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register(TOY)
    with pytest.raises(ValueError, match="another loss is registered as 'answer-ce'"):
        register(
            Method("toy2", "Toy 2", "text", TALLREC.cf_source, Loss("answer-ce", brier_loss, counted_score))
        )
    with pytest.raises(CCFLLMError, match=r"Unknown method 'tallrek'; choose one of \['ccf-llm', 'tallrec'"):
        get_method("tallrek")
    assert list(METHODS) == ["ccf-llm", "tallrec", "tallrec-cf", "collm", "softprompt", "toy"]


def test_a_record_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="'cf-text' prompt, and only it, lists a CF ranking"):
        Method("bad", "Bad", prompt="cf-text", cf_source=FREE_TABLES, loss=TALLREC.loss)
    with pytest.raises(ValueError, match="default strategy is not among its strategies"):
        Method(
            "bad", "Bad", prompt="text", cf_source=FREE_TABLES, loss=TALLREC.loss, strategies=("zero-shot",)
        )
    with pytest.raises(ValueError, match="unknown settings"):
        Method("bad", "Bad", prompt="text", cf_source=FREE_TABLES, loss=TALLREC.loss, settings={"lr": 1.0})


def test_a_plan_refuses_a_variant_whose_strategy_the_method_cannot_run():
    from ccfllm.runner import Planned

    assert Planned("tallrec", "mf", "zero-shot").variant == "zero-shot"
    with pytest.raises(
        CCFLLMError, match=r"tallrec runs the strategies \['stage1-only', 'zero-shot'\] alone"
    ):
        Planned("tallrec", "mf", "end-to-end")
