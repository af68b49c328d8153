"""ccfllm.load of an A-LLMRec run: `.rank` orders candidates as the run's own candidate scores do."""

from __future__ import annotations

import numpy as np
import pytest

import ccfllm
from ccfllm.api import NextItemRecommender
from ccfllm.data.dataset import PAD
from ccfllm.errors import CCFLLMError
from ccfllm.next_item_config import allmrec_config
from ccfllm.next_item_experiment import run_allmrec, sample_split
from ccfllm.next_item_scoring import candidate_scores
from test_allmrec import tiny_run_settings
from test_next_item import cyclic_dataset


def test_rank_orders_a_users_candidates_by_the_runs_scores(tmp_path, tiny_llm_dir):
    dataset = cyclic_dataset(n_users=24, n_items=30, length=8)
    config = allmrec_config("cpu", **tiny_run_settings(tmp_path, tiny_llm_dir))
    folder = run_allmrec(config, dataset, tmp_path / "run", progress=False).folder
    model = ccfllm.load(folder, data=dataset, device="cpu")
    assert isinstance(model, NextItemRecommender) and model.info()["method"] == "allmrec"
    test = sample_split(model.run.task.splits["test"], 1, 0)
    history = [int(i) for i in test.history[0] if i != PAD]
    candidates = test.candidates[0].tolist()
    ranked = model.rank(int(test.uid[0]), candidates, history=history)
    scores = candidate_scores(model.run.model, model.run.prompts, test)[0]
    assert sorted(ranked["iid"]) == sorted(candidates) and ranked["rank"].tolist() == list(range(1, 7))
    np.testing.assert_allclose(ranked["score"], np.sort(scores)[::-1], rtol=1e-5)
    with pytest.raises(CCFLLMError, match="distinct titled candidate items"):
        model.rank(1, [candidates[0], candidates[0]])
    with pytest.raises(CCFLLMError, match="ranks candidates"):
        model.score(None)
