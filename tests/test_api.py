"""ccfllm.load and its recommender, on the tiny run built in code (conftest.tiny_run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import ccfllm
from ccfllm.api import CCFRecommender, parse_history
from ccfllm.cli import main
from ccfllm.engine import score_rows
from ccfllm.errors import CCFLLMError
from ccfllm.prediction import predict_rows
from ccfllm.prompt import ITEM


@pytest.fixture(scope="module")
def model(tiny_run, tiny_dataset) -> CCFRecommender:
    return ccfllm.load(tiny_run, data=tiny_dataset, device="cpu")


def test_load_takes_a_dataset_folder_or_a_loaded_dataset(tiny_run, tiny_dir, model):
    from_folder = ccfllm.load(tiny_run, data=tiny_dir, device="cpu")
    rows = pd.DataFrame({"uid": [1, 2], "iid": [3, 4]})
    pd.testing.assert_frame_equal(from_folder.score(rows), model.score(rows))
    assert model.info()["method"] == "ccf-llm" and model.info()["backbone"] == "mf"
    assert [row["model"] for row in model.info()["metrics"]][-1] == "CCF-LLM after stage fusion"


def test_score_equals_predict_rows_and_the_cli(model, tiny_run, tiny_dir, tiny_dataset, tmp_path):
    rows = pd.DataFrame(
        {"uid": [1, 1, 5, 999], "iid": [2, 7, 3, 2], "history": ["[4, 6]", "[]", "9 11", None]}
    )
    scored = model.score(rows)
    histories = [[4, 6], [], [9, 11], []]  # user 999 is not in the data: no liked items
    expected = predict_rows(model.run, tiny_dataset, rows.assign(history=histories))
    pd.testing.assert_frame_equal(scored, expected)
    # a missing history is the user's liked items in the dataset, as predict_rows gives them
    no_history = pd.DataFrame({"uid": [1, 3], "iid": [2, 2]})
    pd.testing.assert_frame_equal(model.score(no_history), predict_rows(model.run, tiny_dataset, no_history))

    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    parquet = tmp_path / "rows.parquet"
    rows.assign(history=[[4, 6], [], [9, 11], None]).to_parquet(parquet)
    for source in (csv, parquet):
        out = tmp_path / f"{source.suffix[1:]}-scores.parquet"
        arguments = ["--run", tiny_run, "--data", tiny_dir, "--input", source, "--output", out]
        result = CliRunner().invoke(main, ["predict", "--device", "cpu", *map(str, arguments)])
        assert result.exit_code == 0, result.output
        pd.testing.assert_frame_equal(pd.read_parquet(out), scored)


def test_a_history_cell_is_read_from_a_list_or_a_string_and_anything_else_is_one_error():
    assert parse_history("[1, 2, 3]") == parse_history("1 2 3") == parse_history([1, 2, 3]) == [1, 2, 3]
    assert parse_history(np.array([4])) == [4] and parse_history("[]") == [] and parse_history(None) is None
    with pytest.raises(CCFLLMError, match=r"history \(row 3\) must list item ids"):
        parse_history("[1, two]", 3)
    with pytest.raises(CCFLLMError, match="integer item ids"):
        parse_history([1.5])


def test_recommend_returns_k_distinct_unseen_items_ordered_by_score(model, tiny_dataset):
    top = model.recommend(2, k=3)  # each tiny user has rows for 36 of the 40 items: 4 are unseen
    assert top["rank"].tolist() == [1, 2, 3]
    assert top["iid"].is_unique
    seen = set()
    for split in tiny_dataset.splits.values():
        seen |= set(split.iid[split.uid == 2].tolist())
    assert not set(top["iid"]) & seen
    assert (np.diff(top["score"].to_numpy()) <= 0).all()
    # the top scores are the best of every unseen item's score, as score() gives them
    unseen = [i for i in range(1, tiny_dataset.n_items) if i not in seen]
    every = model.score(pd.DataFrame({"uid": 2, "iid": unseen}))
    assert len(unseen) == 4 and len(model.recommend(2, k=10)) == 4
    best = every.sort_values(["score", "iid"], ascending=[False, True]).head(3)
    assert top["iid"].tolist() == best["iid"].tolist()
    np.testing.assert_allclose(top["score"], best["score"], atol=1e-6)
    assert top["title"].tolist() == [tiny_dataset.item_titles[i] for i in top["iid"]]


def test_recommend_over_candidates_and_a_backbone_shortlist(model):
    chosen = model.recommend(2, k=2, candidates=[3, 5, 8, 8], exclude_seen=False)
    assert set(chosen["iid"]) <= {3, 5, 8} and len(chosen) == 2
    shortlisted = model.recommend(2, k=3, shortlist=2)
    assert len(shortlisted) == 2
    with pytest.raises(CCFLLMError, match="not titled items"):
        model.recommend(2, candidates=[9999])
    with pytest.raises(CCFLLMError, match="k must be a positive integer"):
        model.recommend(2, k=0)


def test_explain_withholds_cf_as_zero_features_and_reads_gates_alpha(model, tiny_dataset):
    explanation = model.explain(1, 2, history=[4, 6])
    assert explanation.score == pytest.approx(model.score(_row(1, 2, [4, 6]))["score"][0], abs=1e-5)
    # withheld CF: as scoring the row with no known user or item (CFFeatures then gives zero vectors)
    features = model.run.model.cf
    saved = features.known_users.clone(), features.known_items.clone()
    features.known_users.zero_()
    features.known_items.zero_()
    try:
        zero = model.score(_row(1, 2, [4, 6]))
        assert zero["cf"][0] == "none"
    finally:
        features.known_users.copy_(saved[0])
        features.known_items.copy_(saved[1])
    assert explanation.score_without_cf == pytest.approx(zero["score"][0], abs=1e-5)
    assert explanation.score_without_cf != pytest.approx(explanation.score, abs=1e-7)
    assert explanation.score_without_text is not None and explanation.cf == "user+item"
    # the backbone's own score: sigmoid of its logit
    backbone = features.backbone
    history = torch.tensor([[0] * (backbone.config.max_history - 2) + [4, 6]])
    logit = backbone(torch.tensor([1]), torch.tensor([2]), history)
    assert explanation.cf_backbone_score == pytest.approx(torch.sigmoid(logit).item(), abs=1e-6)

    # alpha per title token: GATE's output at that token (Eq. 3), its mean magnitude, by hand; on
    # random GATE output layers, since a tiny stage 2 may keep its zero start (alpha = 0 everywhere)
    net = model.run.model
    saved_gate = {k: v.clone() for k, v in net.gate.state_dict().items()}
    try:
        torch.manual_seed(1)
        for mlp in (net.gate.from_cf, net.gate.from_text):
            torch.nn.init.normal_(mlp[-1].weight)
        explained = model.explain(1, 2, history=[4, 6])
        prompts = model.run.final_prompts()
        encoded = prompts.encode(2, np.array([4, 6]), 1)
        positions = np.flatnonzero(encoded.kind == ITEM)
        with torch.no_grad():
            tokens = net.llm.get_input_embeddings()(torch.as_tensor(encoded.input_ids[positions])).float()
            aligned = net.alignment(features.items(torch.as_tensor(encoded.item[positions])).float())
            by_hand = net.gate(aligned, tokens).abs().mean(-1).numpy()
    finally:
        net.gate.load_state_dict(saved_gate)
    assert [t["position"] for t in explained.tokens] == positions.tolist()
    assert by_hand.min() > 0
    np.testing.assert_allclose([t["alpha"] for t in explained.tokens], by_hand, rtol=1e-5)
    per_item = {i["item"]: i["alpha"] for i in explained.items}
    target_tokens = encoded.item[positions] == 2
    assert per_item[2] == pytest.approx(by_hand[target_tokens].mean(), rel=1e-5)
    assert [i["item"] for i in explanation.items] == [4, 6, 2]
    assert [i["role"] for i in explanation.items] == ["history", "history", "target"]


def test_explain_leaves_every_score_as_it_was(model, tiny_dataset):
    before = score_rows(model.run.model, model.run.final_prompts(), tiny_dataset.test, np.arange(8))
    model.explain(3, 5)
    after = score_rows(model.run.model, model.run.final_prompts(), tiny_dataset.test, np.arange(8))
    np.testing.assert_array_equal(before, after)
    assert not model.run.model.gate._forward_hooks  # the alpha recorder is gone


def test_bad_input_gets_one_clear_error(model, tmp_path):
    with pytest.raises(CCFLLMError, match="not titled items|add a `title` column"):
        model.score(pd.DataFrame({"uid": [1], "iid": [500]}))
    with pytest.raises(CCFLLMError, match="user id must be an integer"):
        model.recommend("1")
    with pytest.raises(CCFLLMError, match="no config.json"):
        ccfllm.load(tmp_path, data=model.dataset)
    with pytest.raises(CCFLLMError, match="no rows to score"):
        model.score(pd.DataFrame({"uid": pd.Series([], dtype=int), "iid": pd.Series([], dtype=int)}))


def _row(uid: int, iid: int, history: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"uid": [uid], "iid": [iid], "history": [history]})
