"""Figure 4's item views and Table 5's case study, on a tiny CCF-LLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccfllm.analysis import case_study, item_views, tsne_figure
from ccfllm.cf.train import predict_split
from ccfllm.config import ccf_config
from ccfllm.errors import CCFLLMError
from ccfllm.llm import load_llm
from ccfllm.recommender import build_recommender
from ccfllm.report import write_report
from conftest import TINY_CCF


def build(tiny_llm_dir, tiny_dataset, backbone, method="ccf-llm"):
    config = ccf_config("cpu", llm=str(tiny_llm_dir), method=method, **TINY_CCF)
    return build_recommender(config, tiny_dataset, backbone, load_llm(str(tiny_llm_dir), device="cpu"))


def test_item_views_are_aligned_cf_title_and_fused_embeddings(tiny_llm_dir, tiny_dataset, backbone):
    recommender = build(tiny_llm_dir, tiny_dataset, backbone)
    views = item_views(recommender, tiny_dataset, n_items=20)
    assert views["aligned CF"].shape == views["LLM title"].shape == (20, 32)
    # GATE starts at zero: alpha = 0 and the fused tokens are the title tokens (Eq. 4)
    np.testing.assert_array_equal(views["fused"], views["LLM title"])
    with torch.no_grad():
        for mlp in (recommender.model.gate.from_cf, recommender.model.gate.from_text):
            mlp[-1].bias.fill_(1.0)
    moved = item_views(recommender, tiny_dataset, n_items=20)
    np.testing.assert_allclose(moved["fused"], moved["LLM title"] + 2 * moved["aligned CF"], atol=1e-5)
    iid = int(views["iid"][0])
    ids = torch.as_tensor(recommender.hybrid_prompts.title_tokens(iid))
    title_mean = recommender.model.llm.get_input_embeddings()(ids).float().mean(0)
    np.testing.assert_allclose(views["LLM title"][0], title_mean.detach().numpy(), atol=1e-6)
    with pytest.raises(CCFLLMError, match="fused tokens; this run is collm"):
        item_views(build(tiny_llm_dir, tiny_dataset, backbone, "collm"), tiny_dataset)


def test_the_case_study_ranks_one_users_items_three_ways(tiny_llm_dir, tiny_dataset, backbone, tmp_path):
    recommender = build(tiny_llm_dir, tiny_dataset, backbone)
    table = case_study(recommender, tiny_dataset, n_items=5)
    assert len(table) == 5 and table["uid"].nunique() == 1 and set(table["label"]) == {0, 1}
    for column in ("rank by CF backbone", "rank by zero-shot LLM", "rank by CCF-LLM"):
        assert sorted(table[column]) == [1, 2, 3, 4, 5]
    rows = np.flatnonzero(
        np.isin(tiny_dataset.test.uid, table["uid"]) & np.isin(tiny_dataset.test.iid, table["iid"])
    )
    cf_scores = predict_split(backbone, tiny_dataset.test.take(rows))
    assert table["rank by CF backbone"].tolist() == ((-cf_scores).argsort().argsort() + 1).tolist()
    views = item_views(recommender, tiny_dataset, n_items=20)
    tsne_figure(views, tmp_path / "f4.png")
    assert (tmp_path / "f4.png").read_bytes()[:4] == b"\x89PNG"
    record = {
        "key": "cpu/ccf-llm/mf/default/seed0",
        "method": "ccf-llm",
        "backbone": "mf",
        "variant": "default",
        "seed": 0,
        "preset": "cpu",
        "test_auc": 0.7,
        "test_uauc": 0.6,
        "provenance": {"commit": "c", "machine": "m", "wall_s": 1.0},
    }
    text = write_report(
        [record], tmp_path, "cpu", "r.jsonl", (recommender, tmp_path, tiny_dataset)
    ).read_text()
    assert "## Table 5: case study" in text and "![Figure 4](figure4.png)" in text
    assert (tmp_path / "figure4.png").is_file()
