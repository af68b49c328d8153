"""The baselines beside CCF-LLM (TALLRec, CoLLM, Softprompt), each trained a few steps on the tiny data
with a tiny Llama: what distinguishes each, their losses on hand-made numbers, and saved runs that
reload to the same scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccfllm.cf.train import train_cf
from ccfllm.config import ccf_config, cf_config
from ccfllm.errors import CCFLLMError
from ccfllm.experiment import run_ccf_llm
from ccfllm.llm import load_llm
from ccfllm.methods.ccf_llm import Answer
from ccfllm.methods.collm import collm_loss, yes_logit_score
from ccfllm.methods.tallrec import tallrec_loss
from ccfllm.methods.tallrec_cf import similar_items
from ccfllm.prompt import ITEM, ITEM_SLOT, TEXT, USER, PromptBuilder
from ccfllm.recommender import build_recommender, evaluate_run, load_run
from ccfllm.train import Stage, loss_for, trainable_parameters, training_step
from conftest import TINY_CCF


def build(method, tiny_llm_dir, tiny_dataset, backbone, **overrides):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), method=method, **{**TINY_CCF, **overrides})
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    return build_recommender(config, tiny_dataset, backbone, llm)


def train_rows(recommender, dataset, stage, steps=10, rows=slice(0, 32)):
    train, config = dataset.train, recommender.config
    batch = recommender.prompts_for(stage).batch(
        train.uid[rows], train.iid[rows], train.history[rows], train.label[rows]
    )
    parameters = trainable_parameters(recommender.model, stage, config.tune_cf)
    optimiser = torch.optim.AdamW(parameters, lr=5e-2, weight_decay=0.0)  # as train_stage
    recommender.model.train()
    losses = [training_step(recommender.model, batch, optimiser, loss_for(config)) for _ in range(steps)]
    return batch, losses


# -- each method's settings -------------------------------------------------------------------------


def test_each_method_brings_its_own_loss_and_strategy_and_refuses_what_it_cannot_do(tiny_llm_dir):
    assert ccf_config("cpu").loss == "eq5"
    assert ccf_config("cpu", method="collm").loss == "yes-logit"
    assert ccf_config("cpu", method="collm", loss="eq5").loss == "eq5"  # Eq. 5 as a CoLLM variant
    tallrec = ccf_config("cpu", method="tallrec")
    assert (tallrec.loss, tallrec.strategy) == ("answer-ce", "stage1-only")
    with pytest.raises(CCFLLMError, match="tallrec has no CF positions"):
        ccf_config("cpu", method="tallrec", strategy="two-stage")
    with pytest.raises(CCFLLMError, match="Unknown method 'colm'"):
        ccf_config("cpu", method="colm")


# -- losses and scores on hand-made numbers ------------------------------------------------------------


def test_collm_trains_and_scores_on_the_yes_logit_alone():
    answer = Answer(
        torch.log(torch.tensor([0.2, 0.2])), torch.log(torch.tensor([0.7, 0.7])), torch.tensor([2.0, -1.0])
    )
    label = torch.tensor([1.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert collm_loss(answer, label).item() == pytest.approx(expected, abs=1e-6)
    assert yes_logit_score(answer).tolist() == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))])


def test_tallrec_loss_is_the_cross_entropy_of_the_right_answer_token():
    answer = Answer(torch.log(torch.tensor([0.8, 0.3])), torch.log(torch.tensor([0.1, 0.6])), torch.zeros(2))
    loss = tallrec_loss(answer, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(0.8) - math.log(0.6)) / 2, abs=1e-6)


# -- TALLRec ---------------------------------------------------------------------------------------


def test_tallrec_reads_text_only_and_trains_only_lora(tiny_llm_dir, tiny_dataset):
    recommender = build("tallrec", tiny_llm_dir, tiny_dataset, backbone=None)
    model = recommender.model
    assert model.cf is None and model.alignment is None and model.fusion_modules() == []
    batch, losses = train_rows(recommender, tiny_dataset, Stage.LORA)
    assert set(batch.kind.unique().tolist()) == {TEXT}  # no CF position anywhere
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


# -- CoLLM -----------------------------------------------------------------------------------------


def test_collm_prompt_keeps_titles_as_text_and_adds_one_cf_slot_per_item(tiny_llm_dir, tiny_dataset):
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    titles = tiny_dataset.item_titles
    slots = PromptBuilder(llm.tokenizer, titles, layout="slots").encode(5, [1, 2, 3])
    fused = PromptBuilder(llm.tokenizer, titles).encode(5, [1, 2, 3])
    assert slots.item[slots.kind == ITEM_SLOT].tolist() == [1, 2, 3, 5]  # history, then the target
    assert (slots.kind == ITEM).sum() == 0 and (slots.kind == USER).sum() == 1
    assert len(slots.input_ids) == len(fused.input_ids) + 4  # one more position per item
    # the same words: the slotted prompt without its slots is the fused prompt's token sequence
    assert slots.input_ids[slots.kind != ITEM_SLOT].tolist() == fused.input_ids.tolist()
    builder = PromptBuilder(llm.tokenizer, titles, layout="slots")
    assert builder.render(5, [1]).count("[ItemCF]") == 2


def test_collm_stage_two_trains_the_mapping_that_fills_the_slots(tiny_llm_dir, tiny_dataset, backbone):
    recommender = build("collm", tiny_llm_dir, tiny_dataset, backbone)
    model = recommender.model
    assert model.click_score is yes_logit_score
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch, losses = train_rows(recommender, tiny_dataset, Stage.FUSION)
    assert (batch.kind == ITEM_SLOT).sum(-1).tolist() == [n + 1 for n in (batch.history > 0).sum(-1).tolist()]
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"alignment"}  # the LLM, its LoRA and the CF backbone stay; GATE is unused
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


# -- Softprompt --------------------------------------------------------------------------------------


def test_softprompt_item_rows_change_in_training_while_ccf_llm_cf_tables_do_not(
    tiny_llm_dir, tiny_dataset, backbone
):
    soft = build("softprompt", tiny_llm_dir, tiny_dataset, backbone=None)
    ccf = build("ccf-llm", tiny_llm_dir, tiny_dataset, backbone)
    soft_items = soft.model.cf.item_table.weight.detach().clone()
    ccf_items = ccf.model.cf.backbone.item_embedding(torch.arange(tiny_dataset.n_items)).detach().clone()
    batch, losses = train_rows(soft, tiny_dataset, Stage.FUSION)
    train_rows(ccf, tiny_dataset, Stage.FUSION)
    shown = batch.item[batch.kind == ITEM_SLOT].unique()
    moved = (soft.model.cf.item_table.weight - soft_items).abs().sum(-1)
    assert (moved[shown] > 0).all()  # every item the prompts showed was trained
    unseen = torch.ones(tiny_dataset.n_items, dtype=torch.bool)
    unseen[shown] = False
    assert (moved[unseen] == 0).all()  # and nothing else
    assert torch.equal(ccf.model.cf.backbone.item_embedding(torch.arange(tiny_dataset.n_items)), ccf_items)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    with pytest.raises(CCFLLMError, match="tune_cf needs a CF backbone"):
        build("softprompt", tiny_llm_dir, tiny_dataset, backbone=None, tune_cf=True)


# -- saved runs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tallrec", "collm", "softprompt"])
def test_a_baseline_run_reloads_to_the_same_test_scores(method, tiny_llm_dir, tiny_dataset, tmp_path):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), method=method, **TINY_CCF)
    result = run_ccf_llm(config, tiny_dataset, tmp_path / method, progress=False)
    title = {"tallrec": "TALLRec", "collm": "CoLLM", "softprompt": "Softprompt"}[method]
    assert result.table[-1]["model"].startswith(f"{title} after stage")
    assert ("mf (CF backbone alone)" in [r["model"] for r in result.table]) == (method == "collm")
    reloaded = load_run(result.folder, tiny_dataset, device="cpu")
    assert (
        evaluate_run(reloaded, tiny_dataset, ("test",), progress=False)["test"]["auc"]
        == result.table[-1]["test_auc"]
    )


def test_the_yes_logit_score_ranks_differently_from_the_normalised_p_yes():
    # why CoLLM's score is its own: a high "Yes" logit with a higher "No" logit
    logits = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 0.0]])
    answer = Answer(*F.log_softmax(logits, -1)[:, :2].T, logits[:, 0])
    assert yes_logit_score(answer)[0] > yes_logit_score(answer)[1]
    assert (answer.log_p_yes - answer.log_p_no)[0] < (answer.log_p_yes - answer.log_p_no)[1]


# -- the pilot study (Table 2): CF written as text, and zero-shot ------------------------------------


def test_similar_items_are_the_backbones_top_test_items_the_user_did_not_rate(tiny_dataset, backbone):
    similar = similar_items(backbone, tiny_dataset, k=3)
    candidates = np.unique(tiny_dataset.test.iid)
    for uid in (1, 2):
        history = torch.as_tensor(tiny_dataset.train.history[tiny_dataset.train.uid == uid][-1:])
        users = backbone.user_embedding(torch.tensor([uid]), history)
        items = torch.as_tensor(candidates)
        scores = (users @ backbone.item_embedding(items).T).squeeze(0) + backbone.item_bias(items).squeeze(-1)
        rated = set(tiny_dataset.train.iid[tiny_dataset.train.uid == uid].tolist())
        expected = [
            int(i) for i in candidates[torch.argsort(scores, descending=True).numpy()] if i not in rated
        ]
        assert similar[uid] == expected[:3]


def test_the_cf_text_prompt_lists_the_users_similar_titles(tiny_llm_dir, tiny_dataset):
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    titles = tiny_dataset.item_titles
    builder = PromptBuilder(llm.tokenizer, titles, layout="cf-text", similar_items={7: [4, 6]})
    text = builder.render(5, [1, 2], uid=7)
    assert f'may also enjoy: "{titles[4]}", "{titles[6]}". Using all available' in text
    prompt = builder.encode(5, [1, 2], uid=7)
    assert prompt.input_ids.tolist() == llm.tokenizer.encode(text, add_special_tokens=False)
    assert set(prompt.kind.tolist()) == {TEXT}
    assert 'enjoy: "". Using' in builder.render(5, [1, 2], uid=8)  # a user without a list
    with pytest.raises(CCFLLMError, match="encode needs the uid"):
        builder.encode(5, [1, 2])


def test_tallrec_with_cf_as_text_tunes_on_that_prompt(tiny_llm_dir, tiny_dataset, backbone):
    recommender = build("tallrec-cf", tiny_llm_dir, tiny_dataset, backbone)
    assert recommender.model.cf is None
    assert recommender.prompts_for(Stage.LORA).layout == "cf-text"
    batch, losses = train_rows(recommender, tiny_dataset, Stage.LORA)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_zero_shot_scores_the_llm_as_it_comes(tiny_llm_dir, tiny_dataset, tmp_path):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), method="tallrec", strategy="zero-shot", **TINY_CCF)
    result = run_ccf_llm(config, tiny_dataset, tmp_path / "zero", progress=False)
    assert [row["model"] for row in result.table] == ["mean-label reference (k=5)", "TALLRec zero-shot"]
    assert result.stages == []
    reloaded = load_run(result.folder, tiny_dataset, device="cpu")
    scores = evaluate_run(reloaded, tiny_dataset, ("test",), progress=False)["test"]
    assert scores["auc"] == result.table[-1]["test_auc"]
    # untuned: LoRA's B matrices are still zero, so the adapter changes nothing
    lora_b = [p for n, p in reloaded.model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


# -- two backbones fused at once (Eq. 7, Figure 3b) --------------------------------------------------


def test_two_backbones_are_fused_with_a_second_gate(tiny_llm_dir, tiny_dataset, backbone):
    settings = dict(dim=4, lr=1e-2, weight_decay=1e-4, bias_decay=1e-4, max_epochs=3, device="cpu")
    second = train_cf(cf_config("lightgcn", **settings), tiny_dataset, progress=False).model
    config = ccf_config("cpu", llm=str(tiny_llm_dir), cf_model2="lightgcn", **TINY_CCF)
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    recommender = build_recommender(config, tiny_dataset, backbone, llm, second)
    model = recommender.model
    assert model.second_cf.dim == 4 + 2 and model.alignment2 is not None
    batch = recommender.hybrid_prompts.batch(
        *(getattr(tiny_dataset.train, f)[:4] for f in ("uid", "iid", "history"))
    )
    titles = model.llm.get_input_embeddings()(batch.input_ids)
    is_item = batch.kind == ITEM
    with torch.no_grad():
        for mlp in (model.gate.from_cf, model.gate.from_text, model.gate2.from_cf, model.gate2.from_text):
            mlp[-1].bias.fill_(0.5)  # alpha = beta = 1
        aligned = model.alignment(model.cf.items(batch.item[is_item]))
        aligned2 = model.alignment2(model.second_cf.items(batch.item[is_item]))
        fused = model.input_embeddings(batch)[is_item]
    torch.testing.assert_close(fused, titles[is_item] + aligned + aligned2)  # Eq. 7
    assert names(trainable_parameters(model, Stage.FUSION, tune_cf=False), model) == {
        "alignment",
        "gate",
        "alignment2",
        "gate2",
    }
    with pytest.raises(CCFLLMError, match="cf_model2 must be another backbone than cf_model"):
        ccf_config("cpu", cf_model2="mf")
    with pytest.raises(CCFLLMError, match="two fused backbones"):
        ccf_config("cpu", method="collm", cf_model2="sasrec")


def test_a_two_backbone_run_reloads_to_the_same_scores(tiny_llm_dir, tiny_dataset, tmp_path):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), cf_model2="lightgcn", **{**TINY_CCF, "test_rows": 64})
    result = run_ccf_llm(config, tiny_dataset, tmp_path / "pair", progress=False)
    models = [row["model"] for row in result.table]
    assert models[:2] == ["mf (CF backbone alone)", "lightgcn (CF backbone alone)"]
    assert sorted(p.name for p in result.folder.iterdir() if p.is_dir()) == ["adapter", "cf", "cf2"]
    reloaded = load_run(result.folder, tiny_dataset, device="cpu")
    from ccfllm.engine import score_rows
    from ccfllm.experiment import test_split
    from ccfllm.metrics import auc

    test = test_split(tiny_dataset, reloaded.config)
    scores = score_rows(reloaded.model, reloaded.final_prompts(), test, None, 8)
    assert auc(test.label, scores) == result.table[-1]["test_auc"]


def names(parameters, model) -> set[str]:
    chosen = {id(p) for p in parameters}
    return {name.split(".")[0] for name, p in model.named_parameters() if id(p) in chosen}
