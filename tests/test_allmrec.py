"""A-LLMRec stage 1: each loss on hand-made tensors, and a few training steps on tiny data that move the
alignment (and SBERT, unless frozen) and leave SASRec alone; stage 2, the run, and its report."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ccfllm.allmrec_report import write_allmrec_report
from ccfllm.cf.next_item import train_next_item_sasrec
from ccfllm.config import cf_config
from ccfllm.data.next_item import next_item_task
from ccfllm.errors import CCFLLMError, CheckpointError
from ccfllm.methods.allmrec import CollaborativeTextAlignment, alignment_diagnostics
from ccfllm.next_item_config import allmrec_config
from ccfllm.next_item_train import train_alignment
from ccfllm.prompt import ITEM_SLOT, USER
from ccfllm.text_encoder import load_sentence_encoder
from conftest import one_label_flipped, stopping_on_call
from test_next_item import cyclic_dataset
from test_text_encoder import save_tiny_bert


def test_each_loss_on_hand_made_tensors():
    torch.manual_seed(0)
    alignment = CollaborativeTextAlignment(cf_dim=4, text_dim=4, latent_dim=3, hidden=5)
    alignment.text_encoder.load_state_dict(alignment.item_encoder.state_dict())
    items = torch.randn(6, 4)
    user = torch.randn(2, 4)
    positive, negative = items[:2], items[2:4]
    losses = alignment.losses(items, items.clone(), user, positive, negative)
    assert losses.matching.item() == 0.0  # the same encoder on the same vectors
    catalogue = torch.randn(50, 4) * torch.tensor([0.1, 1.0, 2.0, 0.5]) + 3.0
    alignment.set_scales(catalogue, catalogue * 0.01)
    center, spread = catalogue.mean(0), catalogue.std(0)
    scaled = (items - center) / spread
    text_scaled = (items - center * 0.01) / (spread * 0.01)
    losses = alignment.losses(items, items.clone(), user, positive, negative)
    decoded = alignment.item_decoder(alignment.item_encoder(scaled))
    torch.testing.assert_close(losses.item_reconstruction, ((decoded - scaled) ** 2).mean())
    text_decoded = alignment.text_decoder(alignment.text_encoder(text_scaled))
    torch.testing.assert_close(losses.text_reconstruction, ((text_decoded - text_scaled) ** 2).mean())
    item_latent, text_latent = alignment.item_encoder(scaled), alignment.text_encoder(text_scaled)
    torch.testing.assert_close(losses.matching, ((item_latent - text_latent) ** 2).mean())
    pos = (user * (alignment.item_decoder(alignment.item_encoder(scaled[:2])) * spread + center)).sum(-1)
    neg = (user * (alignment.item_decoder(alignment.item_encoder(scaled[2:4])) * spread + center)).sum(-1)
    expected = -F.logsigmoid(pos).mean() - F.logsigmoid(-neg).mean()
    torch.testing.assert_close(losses.recommendation, expected)
    total = losses.total(alpha=0.5, beta=0.25)
    parts = losses.matching + 0.5 * losses.item_reconstruction + 0.25 * losses.text_reconstruction
    torch.testing.assert_close(total, parts + losses.recommendation)


def test_normalised_latents_cannot_shrink_and_the_joint_space_check_reads_them():
    torch.manual_seed(0)
    alignment = CollaborativeTextAlignment(cf_dim=4, text_dim=4, latent_dim=6, hidden=5, latent_norm=True)
    items = torch.randn(8, 4)
    latent = alignment.joint(items)
    torch.testing.assert_close(latent.mean(-1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(latent.var(-1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    with torch.no_grad():
        alignment.item_encoder[2].weight.mul_(0.1)
        alignment.item_encoder[2].bias.mul_(0.1)
    shrunk = alignment.joint(items).var(-1, unbiased=False)
    assert shrunk.min() > 0.9  # a tenth of the weights, yet (but for LayerNorm's eps) the same spread
    free = CollaborativeTextAlignment(cf_dim=4, text_dim=4, latent_dim=6, hidden=5)  # the paper's form
    assert not isinstance(free.item_encoder[-1], torch.nn.LayerNorm)

    alignment.text_encoder.load_state_dict(alignment.item_encoder.state_dict())
    same = alignment_diagnostics(alignment, items, items.clone(), k=1)
    assert same["own_text_top1"] == 1.0 and same["own_text_top1_chance"] == 1 / 8
    assert same["item_latent_spread"] == pytest.approx(same["text_latent_spread"])
    assert same["item_latent_spread"] > 0.2
    one_title = alignment_diagnostics(alignment, items, items[:1].expand(8, 4), k=1)
    assert one_title["text_latent_spread"] == pytest.approx(0.0, abs=1e-6)
    shifted = alignment_diagnostics(alignment, items, items.roll(1, 0), k=1)  # each title on another item
    assert shifted["own_text_top1"] == 0.0


def test_stage_one_moves_the_alignment_and_sbert_and_leaves_sasrec(tmp_path):
    task = next_item_task(cyclic_dataset(), n_candidates=10, seed=0, max_history=10)
    config = cf_config(
        "sasrec", dim=16, lr=1e-2, weight_decay=0.0, max_epochs=3, max_history=10, device="cpu"
    )
    sasrec = train_next_item_sasrec(config, task, progress=False).model
    sasrec_before = copy.deepcopy(sasrec.state_dict())
    encoder = load_sentence_encoder(str(save_tiny_bert(tmp_path / "sbert", "mean", True)))
    sbert_before = copy.deepcopy(encoder.state_dict())
    result = train_alignment(task, sasrec, encoder, latent_dim=8, hidden=16, lr=3e-3, batch_size=8,
                             epochs=6, progress=False)  # fmt: skip
    first, last = result.losses[0], result.losses[-1]
    assert last["matching"] + last["item_reconstruction"] < first["matching"] + first["item_reconstruction"]
    assert all(torch.equal(v, sasrec_before[k]) for k, v in sasrec.state_dict().items())
    assert any(not torch.equal(v, sbert_before[k]) for k, v in encoder.state_dict().items())
    frozen = load_sentence_encoder(str(tmp_path / "sbert"))
    frozen_before = copy.deepcopy(frozen.state_dict())
    train_alignment(task, sasrec, frozen, latent_dim=8, hidden=16, epochs=1, freeze_text=True, progress=False)
    assert all(torch.equal(v, frozen_before[k]) for k, v in frozen.state_dict().items())


# -- stage 2 -------------------------------------------------------------------------------------------


def stage2_model(tmp_path, tiny_llm_dir):
    from ccfllm.llm import load_llm
    from ccfllm.methods.allmrec import ALLMRec
    from ccfllm.next_item_prompt import NextItemPrompts

    dataset = cyclic_dataset(n_users=24, n_items=30, length=8)
    task = next_item_task(dataset, n_candidates=6, seed=0, max_history=10)
    config = cf_config(
        "sasrec", dim=16, lr=1e-2, weight_decay=0.0, max_epochs=2, max_history=10, device="cpu"
    )
    sasrec = train_next_item_sasrec(config, task, progress=False).model
    alignment = CollaborativeTextAlignment(16, 16, latent_dim=8, hidden=16)
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    model = ALLMRec(llm.model, sasrec, alignment, hidden=16)
    return model, NextItemPrompts(llm.tokenizer, task.item_titles, max_history=4), task, llm


def test_the_stage2_prompt_has_a_user_slot_and_one_slot_per_item(tmp_path, tiny_llm_dir):
    from ccfllm.prompt import ITEM_SLOT, USER

    model, prompts, task, llm = stage2_model(tmp_path, tiny_llm_dir)
    history, candidates = np.array([0, 3, 4, 5, 6, 7]), np.array([9, 8, 2])
    prompt = prompts.encode(history, candidates)
    assert (prompt.kind == USER).sum() == 1 and prompt.kind[0] == USER
    assert prompt.item[prompt.kind == ITEM_SLOT].tolist() == [4, 5, 6, 7, 9, 8, 2]  # the 4 most recent
    titles = [f'"{task.item_titles[i]}"' for i in (4, 5, 6, 7, 9, 8, 2)]
    expected = (
        f" is a user representation. This user has watched {', '.join(titles[:4])} in the past. Recommend a "
        f"movie for this user to watch next from the following set of movie titles, {', '.join(titles[4:])}. "
        "The recommendation is"
    )
    text_ids = prompt.input_ids[(prompt.kind != USER) & (prompt.kind != ITEM_SLOT)]
    assert text_ids.tolist() == llm.tokenizer.encode(expected, add_special_tokens=False)
    assert prompts.answer_ids(9).tolist() == llm.tokenizer.encode(' "Movie 9"', add_special_tokens=False)


def test_cached_candidate_scores_equal_the_naive_path(tmp_path, tiny_llm_dir):
    from ccfllm.next_item_scoring import candidate_scores, naive_candidate_scores

    model, prompts, task, _ = stage2_model(tmp_path, tiny_llm_dir)
    test = task.splits["test"]
    subset = type(test)("test", *(getattr(test, f)[:5] for f in ("uid", "history", "target", "candidates")))
    fast = candidate_scores(model, prompts, subset, batch_size=2)
    slow = naive_candidate_scores(model, prompts, subset)
    assert fast.shape == (5, 6)
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    assert np.ptp(slow) > 1e-2  # candidates score apart, so the comparison means something


def test_stage2_trains_only_the_projections(tmp_path, tiny_llm_dir):
    from ccfllm.next_item_train import train_stage2

    model, prompts, task, _ = stage2_model(tmp_path, tiny_llm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_stage2(
        model, prompts, task, lr=3e-3, batch_size=4, epochs=4, n_candidates=6, progress=False
    ).losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"user_projection", "item_projection"}


def test_stage2_steps_through_compiled_layers_equal_uncompiled_ones(tmp_path, tiny_llm_dir):
    from ccfllm.next_item_train import train_stage2

    losses = {}
    for compiled in (False, True):
        model, prompts, task, _ = stage2_model(tmp_path, tiny_llm_dir)
        losses[compiled] = train_stage2(
            model, prompts, task, lr=3e-3, batch_size=4, n_candidates=6, compile=compiled, progress=False
        ).losses
        decoder = model.decoder()
        assert ("_compiled_layers" in vars(decoder)) == compiled and not hasattr(decoder, "_compile_failed")
    assert len(losses[True]) == 6
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_stage2_interrupted_between_steps_goes_on_as_unbroken(tmp_path, tiny_llm_dir, monkeypatch):
    import ccfllm.methods.allmrec as allmrec
    import ccfllm.next_item_train as next_item_train

    settings = dict(lr=3e-3, batch_size=4, epochs=3, n_candidates=6, progress=False)  # 6 steps an epoch
    model, prompts, task, _ = stage2_model(tmp_path, tiny_llm_dir)
    unbroken = next_item_train.train_stage2(model, prompts, task, **settings)
    unbroken_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_as_is, calls = allmrec.next_title_loss, []

    saved = tmp_path / "stage2.progress.safetensors"
    resumable = dict(settings, progress_file=saved, checkpoint_seconds=0.0)  # saved after every step
    for stop in (9, 4, 0):  # in epoch 2, again in epoch 2, then on through epoch 3 (a new order)
        calls.clear()
        monkeypatch.setattr(allmrec, "next_title_loss", stopping_on_call(loss_as_is, stop, calls))
        model, prompts, task, _ = stage2_model(tmp_path, tiny_llm_dir)  # fresh weights each process
        if stop:
            with pytest.raises(KeyboardInterrupt):
                next_item_train.train_stage2(model, prompts, task, **resumable)
        else:
            resumed = next_item_train.train_stage2(model, prompts, task, **resumable)
    assert len(calls) == 18 - 8 - 3  # the third call did only the steps not saved yet
    assert resumed.losses == unbroken.losses
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, unbroken_weights[name]), name


def tiny_run_settings(tmp_path, tiny_llm_dir) -> dict:
    encoder = save_tiny_bert(tmp_path / "sbert", "mean", True)
    settings = dict(
        llm=str(tiny_llm_dir), encoder=str(encoder), device="cpu", dtype="float32", n_candidates=6
    )
    settings.update(compile_training=False)  # test_stage2_steps_through_compiled_layers_... compiles
    settings.update(sasrec_dim=16, sasrec_history=10, sasrec_epochs=3, latent_dim=8, hidden=16)
    settings.update(stage1_epochs=2, stage1_batch=8, stage2_batch=4, stage2_lr=3e-3, prompt_history=4)
    return settings


def test_a_run_reports_every_model_on_all_cold_and_warm_answers(tmp_path, tiny_llm_dir):
    from ccfllm.next_item_experiment import run_allmrec

    settings = tiny_run_settings(tmp_path, tiny_llm_dir)
    config = allmrec_config("cpu", **settings)
    result = run_allmrec(
        config, cyclic_dataset(n_users=24, n_items=30, length=8), tmp_path / "run", progress=False
    )
    models = [row["model"] for row in result.table]
    assert models == [
        "SASRec",
        "LLM alone (zero-shot, titles)",
        "A-LLMRec",
        "A-LLMRec (SBERT)",
        "TALLRec (LoRA, titles)",
    ]
    timings = json.loads((result.folder / "metrics.json").read_text())["timings"]
    assert timings["train_speedup_vs_tallrec"] > 0 and timings["inference_speedup_vs_tallrec"] > 0
    for row in result.table:
        assert row["rows"] == 22 and 0 <= row["hit@1"] <= row["hit@5"] <= 1  # 2 of 24 users are cold
        assert row["hit@1 cold users"] is not None
    assert sorted(p.name for p in result.folder.iterdir()) == [
        "alignment.safetensors",
        "config.json",
        "item_projection.safetensors",
        "item_texts.safetensors",
        "metrics.json",
        "sasrec.safetensors",
        "user_projection.safetensors",
    ]
    from ccfllm.next_item_experiment import evaluate_allmrec, load_allmrec

    with pytest.raises(CheckpointError, match="was trained on"):
        load_allmrec(result.folder, one_label_flipped(cyclic_dataset(24, 30, 8)), device="cpu")
    reloaded = evaluate_allmrec(
        load_allmrec(result.folder, cyclic_dataset(24, 30, 8), device="cpu"), progress=False
    )
    assert reloaded["A-LLMRec"]["hit@1"] == result.table[2]["hit@1"]  # exactly
    assert reloaded["A-LLMRec (SBERT)"]["ndcg@10"] == result.table[3]["ndcg@10"]
    for part in ("sasrec", "item_texts", "alignment", "user_projection", "item_projection"):
        broken = tmp_path / f"broken-{part}"
        shutil.copytree(result.folder, broken)
        torch.save({"weight": torch.zeros(2)}, broken / f"{part}.safetensors")  # a pickle: never read
        with pytest.raises(CheckpointError, match=f"{part}.safetensors is truncated, corrupt or not safet"):
            load_allmrec(broken, cyclic_dataset(24, 30, 8), device="cpu")
    mlp = run_allmrec(allmrec_config("cpu", variant="mlp-llm", **settings), cyclic_dataset(24, 30, 8),
                      tmp_path / "mlp", progress=False)  # fmt: skip
    assert mlp.table[2]["model"] == "MLP-LLM"
    report = write_allmrec_report(mlp.folder).read_text()
    assert report.startswith("# A-LLMRec on cyclic\n") and "- MLP-LLM > SASRec (Hit@1):" in report
    assert (mlp.folder / "curves.png").stat().st_size > 0
    cold, warm = result.table[0]["rows cold"], result.table[0]["rows warm"]
    assert 0 < cold + warm <= 22 and result.table[0]["rows cold users"] == 2


def test_an_interrupted_run_resumes_to_the_same_figures(tmp_path, tiny_llm_dir, monkeypatch):
    from ccfllm import next_item_experiment as experiment
    from ccfllm.partial import partial_folder

    config = allmrec_config("cpu", **tiny_run_settings(tmp_path, tiny_llm_dir))
    dataset = cyclic_dataset(n_users=24, n_items=30, length=8)
    unbroken = experiment.run_allmrec(config, dataset, tmp_path / "unbroken", progress=False)
    calls = {"stage 1": 0, "stage 2": 0}
    stage1_as_is, stage2_as_is, tallrec_as_is = (
        experiment.train_sasrec_and_alignment,
        experiment.train_stage2,
        experiment._tallrec,
    )

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out, partial = tmp_path / "run", partial_folder(tmp_path / "run")
    monkeypatch.setattr(experiment, "train_stage2", interrupt)  # in stage 2: parts 1 and 2 kept
    with pytest.raises(KeyboardInterrupt):
        experiment.run_allmrec(config, dataset, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in (partial / "parts").iterdir()) == ["1-sasrec-stage1", "2-zero-shot"]
    with pytest.raises(CheckpointError, match="pass --resume to continue it, or --overwrite"):
        experiment.run_allmrec(config, dataset, out, progress=False)
    other = dataclasses.replace(config, stage2_lr=1e-3)
    with pytest.raises(CheckpointError, match="stage2_lr: 0.003 there, 0.001 now"):
        experiment.run_allmrec(other, dataset, out, progress=False, resume=True)

    monkeypatch.setattr(experiment, "train_stage2", counted("stage 2", stage2_as_is))
    monkeypatch.setattr(experiment, "train_sasrec_and_alignment", counted("stage 1", stage1_as_is))
    monkeypatch.setattr(experiment, "_tallrec", interrupt)  # in TALLRec: stage 2 kept too
    with pytest.raises(KeyboardInterrupt):
        experiment.run_allmrec(config, dataset, out, progress=False, resume=True)
    assert sorted(p.name for p in (partial / "parts").iterdir())[-1] == "3-stage2"
    assert calls == {"stage 1": 0, "stage 2": 1}

    monkeypatch.setattr(experiment, "_tallrec", tallrec_as_is)
    resumed = experiment.run_allmrec(config, dataset, out, progress=False, resume=True)
    assert calls == {"stage 1": 0, "stage 2": 2}  # the second: TALLRec's, whose LoRA starts where it would
    assert resumed.table == unbroken.table and not partial.exists()
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (out, unbroken.folder)]
    assert metrics[0]["stage2_losses"] == metrics[1]["stage2_losses"]
    for name in sorted(p.name for p in unbroken.folder.glob("*.safetensors")):
        saved = [load_file(run / name) for run in (out, unbroken.folder)]
        assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[1]), name


def hand_made_run(folder, variant="a-llmrec"):
    """A finished run's config.json and metrics.json, written by hand; its trained rows are named as
    `variant`'s runs name them (A-LLMRec or MLP-LLM)."""
    folder.mkdir()
    config = allmrec_config("cpu", variant=variant).__dict__
    record = {"format": "ccfllm-allmrec/2", "dataset": "toy", "config": config}
    trained = "MLP-LLM" if variant == "mlp-llm" else "A-LLMRec"
    (folder / "config.json").write_text(json.dumps(record))

    def row(model, hit1, cold):
        return {"model": model, "rows": 300, "hit@1": hit1, "hit@5": 0.5, "ndcg@10": 0.4, "hit@1 cold": cold,
                "hit@1 warm": 0.3, "hit@1 cold users": 0.2, "rows cold": 40, "rows warm": 120,
                "rows cold users": 69}  # fmt: skip

    table = [row("SASRec", 0.40, 0.10), row("LLM alone (zero-shot, titles)", 0.05, 0.05),
             row(trained, 0.30, 0.12), row(f"{trained} (SBERT)", 0.28, 0.15),
             row("TALLRec (LoRA, titles)", 0.20, 0.20)]  # fmt: skip
    timings = {"stage2_s": 600.0, "tallrec_train_s": 900.0, "train_speedup_vs_tallrec": 1.5,
               "inference_s": 400.0, "tallrec_inference_s": 380.0, "inference_speedup_vs_tallrec": 0.95,
               "sasrec_s": 500.0, "stage1_s": 100.0,
               "generation": [{"uid": 7, "question": "Q?", "answer": "Drama"}]}  # fmt: skip
    joint_space = {"item_latent_spread": 0.8, "text_latent_spread": 0.07, "own_text_top10": 0.004,
                   "own_text_top10_chance": 0.003}  # fmt: skip
    metrics = {"table": table, "timings": timings, "stage1": [{"matching": 0.1}], "joint_space": joint_space,
               "stage2_losses": [1.0, 0.9]}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_the_report_checks_the_claims_and_sets_the_talks_figures_beside(tmp_path):
    text = write_allmrec_report(hand_made_run(tmp_path / "run"), tmp_path / "out").read_text()
    assert "- A-LLMRec > SASRec (Hit@1): does NOT hold (0.3000 vs 0.4000, over 300 rows)" in text
    assert "- A-LLMRec > LLM alone (Hit@1): holds (0.3000 vs 0.0500, over 300 rows)" in text
    assert "- A-LLMRec (SBERT) > SASRec on cold items (Hit@1): holds (0.1500 vs 0.1000, over 40 rows)" in text
    measured = "0.3000 | 0.5000 | 0.4000 | 0.1200 | 0.3000 | 0.2000"
    printed = "0.6237 / 0.5714 / 0.6880 / 0.5272"
    assert f"| A-LLMRec | {measured} | {printed} |" in text
    assert text.startswith("# A-LLMRec on toy")
    assert "| | A-LLMRec | TALLRec | A-LLMRec's speed-up | talk's (A-LLMRec) |" in text
    assert "| training (s) | 600 | 900 | 1.50x | 2.53x |" in text
    assert "| inference of the test rows (s) | 400 | 380 | 0.95x | 1.71x |" in text
    assert "- user 7: 'Q?' -> 'Drama'" in text
    assert "nearest its CF latent for 0.4% of the items (chance 0.3%)" in text
    assert "CF 0.800, text 0.070." in text
    assert (tmp_path / "out" / "curves.png").is_file()


def test_the_report_of_an_mlp_llm_run_names_it_in_the_claims_and_the_speed_table(tmp_path):
    text = write_allmrec_report(hand_made_run(tmp_path / "run", "mlp-llm"), tmp_path / "out").read_text()
    assert "- MLP-LLM > SASRec (Hit@1): does NOT hold (0.3000 vs 0.4000, over 300 rows)" in text
    assert "| | MLP-LLM | TALLRec | MLP-LLM's speed-up | talk's (A-LLMRec) |" in text
    assert "A-LLMRec's speed-up" not in text  # the title names the system: "# A-LLMRec on toy"


def test_the_report_refuses_an_unfinished_run(tmp_path):
    folder = hand_made_run(tmp_path / "run")
    (folder / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="metrics.json is missing"):
        write_allmrec_report(folder)


def test_untitled_history_items_are_left_out_and_no_history_reads_empty_quotes(tmp_path, tiny_llm_dir):
    from ccfllm.prompt import ITEM_SLOT

    model, prompts, task, llm = stage2_model(tmp_path, tiny_llm_dir)
    prompts.pieces.item_titles[5] = ""  # item 5 loses its title
    prompt = prompts.encode(np.array([3, 5, 6]), np.array([9, 8]))
    assert prompt.item[prompt.kind == ITEM_SLOT].tolist() == [3, 6, 9, 8]
    empty = prompts.encode(np.array([0, 0]), np.array([9, 8]))
    assert empty.item[empty.kind == ITEM_SLOT].tolist() == [9, 8]
    assert llm.tokenizer.encode(' ""', add_special_tokens=False)[0] in empty.input_ids.tolist()


def test_the_soft_prompt_answers_a_free_question(tmp_path, tiny_llm_dir):
    from ccfllm.methods.allmrec import ask

    model, prompts, task, llm = stage2_model(tmp_path, tiny_llm_dir)
    history = np.array([0, 3, 4, 5])
    prompt = prompts.encode_question(history, "Specify the genres this user would enjoy.")
    assert prompt.kind[0] == USER and prompt.item[prompt.kind == ITEM_SLOT].tolist() == [3, 4, 5]
    answer = ask(model, prompts, history, max_tokens=5)
    assert isinstance(answer, str) and 0 < len(llm.tokenizer.encode(answer, add_special_tokens=False)) <= 5


@pytest.mark.parametrize(
    "setting, error",
    [("llm", "no-such-model' is not a local folder"), ("encoder", "No encoder at .*no-such-model")],
)
def test_a_run_whose_llm_or_encoder_is_not_there_fails_before_training_anything(
    tmp_path, tiny_llm_dir, setting, error, monkeypatch
):
    from ccfllm import next_item_experiment

    def no_training(*args, **kwargs):
        raise AssertionError("SASRec trained before the bad setting was found")

    monkeypatch.setattr(next_item_experiment, "train_next_item_sasrec", no_training)
    settings = tiny_run_settings(tmp_path, tiny_llm_dir) | {setting: str(tmp_path / "no-such-model")}
    with pytest.raises(CCFLLMError, match=error):
        next_item_experiment.run_allmrec(
            allmrec_config("cpu", **settings), cyclic_dataset(24, 30, 8), tmp_path / "run"
        )
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_a_finished_part_whose_random_state_is_not_safetensors_is_one_clear_error(tmp_path):
    from ccfllm.next_item_experiment import _resume_from

    (tmp_path / "part.json").write_text("{}")
    torch.save({"rng": torch.get_rng_state()}, tmp_path / "random_state.safetensors")  # a pickle
    with pytest.raises(CheckpointError, match="random_state.safetensors is truncated, corrupt or not safet"):
        _resume_from(tmp_path, torch.device("cpu"))
