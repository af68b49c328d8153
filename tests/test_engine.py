"""The scoring engine against its oracle: the same scores, row by row, with less work."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from ccfllm.cf.train import train_cf
from ccfllm.config import ccf_config, cf_config
from ccfllm.engine import _rows_by_prefix, naive_log_probs, naive_score_rows, score_rows
from ccfllm.llm import load_llm
from ccfllm.llm_speed import float32_output_weight
from ccfllm.prompt import ITEM
from ccfllm.recommender import build_recommender
from ccfllm.scoring_layers import layer_weights
from conftest import TINY_DECODERS, load_tiny_llm


@pytest.fixture(scope="module")
def recommender(tiny_llm_dir, tiny_dataset):
    return _recommender(tiny_llm_dir, tiny_dataset, "attention")


@pytest.fixture(scope="module", params=["attention", "all-linear"])
def any_lora_recommender(request, tiny_llm_dir, tiny_dataset):
    """The recommender with LoRA on q/v (the default), then on every linear layer of the blocks."""
    if request.param == "attention":
        return request.getfixturevalue("recommender")
    return _recommender(tiny_llm_dir, tiny_dataset, request.param)


def _recommender(tiny_llm_dir, tiny_dataset, lora_targets: str):
    cf = cf_config("mf", dim=8, lr=1e-2, weight_decay=1e-4, bias_decay=1e-4, max_epochs=3, device="cpu")
    backbone = train_cf(cf, tiny_dataset, progress=False).model
    config = ccf_config(
        "cpu",
        llm=str(tiny_llm_dir),
        device="cpu",
        dtype="float32",
        alg_hidden=16,
        gate_hidden=8,
        compile_scoring=False,
        lora_targets=lora_targets,
    )
    torch.manual_seed(0)
    built = build_recommender(
        config, tiny_dataset, backbone, load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    )
    with torch.no_grad():  # move GATE off its zero start, so that the fusion shows in the scores
        for parameter in built.model.gate.parameters():
            parameter.normal_(0.0, 0.3)
    return built


def test_a_prompt_is_its_prefix_then_its_suffix(recommender, tiny_dataset):
    test = tiny_dataset.test
    prompt = recommender.hybrid_prompts.encode(int(test.iid[0]), test.history[0])
    head, tail = prompt.prefix(), prompt.suffix()
    np.testing.assert_array_equal(np.concatenate([head.input_ids, tail.input_ids]), prompt.input_ids)
    assert set(tail.item[tail.kind == ITEM]) == {test.iid[0]}  # the target's title opens the suffix
    assert test.iid[0] not in set(head.item) or test.iid[0] in set(head.history)


@pytest.mark.parametrize("with_cf", [True, False])
def test_engine_scores_equal_the_naive_path(recommender, tiny_dataset, with_cf):
    test = tiny_dataset.test
    builder = recommender.hybrid_prompts if with_cf else recommender.text_prompts
    rows = np.arange(len(test))
    prompts = [builder.encode(int(test.iid[r]), test.history[r]) for r in rows]
    assert len(_rows_by_prefix(prompts, test.uid)) < len(rows)  # some rows do share a prefix here
    engine = score_rows(recommender.model, builder, test, rows, batch_size=4)
    naive = naive_score_rows(recommender.model, builder, test, rows, batch_size=5)
    np.testing.assert_allclose(engine, naive, rtol=0, atol=1e-6)
    assert np.ptp(naive) > 1e-4  # rows score 100x the tolerance apart, so the comparison means something


def test_scoring_merges_trained_lora_into_the_weights_and_puts_them_back(any_lora_recommender, tiny_dataset):
    recommender = any_lora_recommender
    model, builder, test = copy.deepcopy(recommender.model), recommender.hybrid_prompts, tiny_dataset.test
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    per_layer = {"attention": 2, "all-linear": 7}[recommender.config.lora_targets]
    assert len(lora_layers) == 2 * per_layer  # the tiny Llama has 2 layers
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapters an effect to merge
        for layer in lora_layers:
            layer.lora_B["default"].weight.normal_(0.0, 0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = np.arange(len(test))
    without = score_rows(copy.deepcopy(model).apply(_disable_adapters), builder, test, rows, batch_size=4)
    merged_seen = []
    hook = lora_layers[0].register_forward_hook(
        lambda module, args, output: merged_seen.append(module.merged)
    )
    engine = score_rows(model, builder, test, rows, batch_size=4)
    hook.remove()
    naive = naive_score_rows(
        model, builder, test, rows, batch_size=5
    )  # the oracle runs the adapters as they are
    assert merged_seen and all(merged_seen)
    np.testing.assert_allclose(engine, naive, rtol=0, atol=1e-5)
    assert np.abs(engine - without).max() > 1e-3  # the adapters do change the scores
    for name, parameter in model.named_parameters():  # put back bit for bit, adapters active again
        assert torch.equal(parameter, before[name]), name
    assert not any(layer.merged for layer in lora_layers)


def _disable_adapters(module: torch.nn.Module) -> None:
    if isinstance(module, LoraLinear):
        module.enable_adapters(False)


@pytest.mark.parametrize("compiled", [False, True])
def test_llama_layers_as_one_function_give_the_decoders_scores(
    any_lora_recommender, tiny_dataset, monkeypatch, compiled
):
    from ccfllm import scoring_layers

    recommender = any_lora_recommender
    model, builder, test = copy.deepcopy(recommender.model), recommender.hybrid_prompts, tiny_dataset.test
    torch.manual_seed(1)
    with torch.no_grad():  # trained adapters, so that the merged weights are what the layers must read
        for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
            layer.lora_B["default"].weight.normal_(0.0, 0.5)
    rows = np.arange(len(test))
    through_decoder = score_rows(model, builder, test, rows, batch_size=4)
    ran = _layers_run(monkeypatch, compiled)
    model.compile_scoring = True
    as_functions = score_rows(model, builder, test, rows, batch_size=4)
    assert ran and all((layer is scoring_layers.decoder_layer) != compiled for layer in ran)
    np.testing.assert_allclose(as_functions, through_decoder, rtol=0, atol=1e-5 if compiled else 1e-6)
    assert np.ptp(through_decoder) > 1e-3


def _layers_run(monkeypatch, compiled: bool) -> list:
    """The layer functions scoring runs from here on, listed as they run; `compiled` False: as where
    torch.compile has failed."""
    from ccfllm import scoring_layers

    ran = []
    run_layers = scoring_layers._run_layers
    monkeypatch.setattr(
        scoring_layers, "_run_layers", lambda layer, *rest: ran.append(layer) or run_layers(layer, *rest)
    )
    if not compiled:
        monkeypatch.setattr(scoring_layers, "_compiled", {"failed": True})
    return ran


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "family, kv_heads",
    # 2: each key/value head serves two query heads, as in SmolLM2; Qwen2: biases on q/k/v and six
    # query heads on one key/value head, as in Qwen2.5-1.5B (twelve on two)
    [("llama", 4), ("llama", 2), ("qwen2", 1)],
)
def test_layer_function_sees_each_row_as_its_own_unpadded_prompt(
    tmp_path, tiny_dataset, monkeypatch, compiled, family, kv_heads
):
    from ccfllm import scoring_layers

    folder = TINY_DECODERS[family](tmp_path / family, tiny_dataset.item_titles, kv_heads=kv_heads)
    decoder = load_tiny_llm(folder, tiny_dataset.item_titles).model.model  # LlamaModel or Qwen2Model
    assert scoring_layers.layer_weights(decoder) is not None
    if not compiled:
        monkeypatch.setattr(scoring_layers, "_compiled", {"failed": True})
    torch.manual_seed(0)
    width = decoder.config.hidden_size
    prefix_lengths, suffix_lengths, owner = [5, 3, 7], [2, 4, 1, 3, 2], [0, 0, 1, 2, 2]
    prefixes = [torch.randn(n, width) for n in prefix_lengths]
    suffixes = [torch.randn(n, width) for n in suffix_lengths]
    with torch.no_grad():
        hidden = scoring_layers.answer_hidden(
            decoder,
            scoring_layers.layer_weights(decoder),
            _left_padded(prefixes),
            _left_padded(suffixes),
            torch.tensor(owner),
        )
        for row, (suffix, prefix) in enumerate(zip(suffixes, owner, strict=True)):
            alone = torch.cat([prefixes[prefix], suffix])[None]  # the row's prompt, unpadded
            expected = decoder(inputs_embeds=alone).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[row], expected, rtol=0, atol=1e-5)


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (n, d) -> (B, T, d) with random values in the padding (which must not matter), mask."""
    length = max(len(r) for r in rows)
    embeddings = torch.randn(len(rows), length, rows[0].shape[1]) * 10
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        embeddings[index, length - len(row) :] = row
        mask[index, length - len(row) :] = 1
    return embeddings, mask


def test_only_layers_with_plain_or_merged_linears_take_the_compiled_path(recommender):
    from ccfllm.llm_speed import merged_lora

    model = copy.deepcopy(recommender.model)
    _, decoder = model.decoder_parts()
    assert layer_weights(decoder) is None  # LoRA unmerged: it would run beside the base weights
    with merged_lora(model):
        assert layer_weights(decoder) is not None
        decoder.layers[0].mlp.up_proj = torch.nn.Bilinear(4, 4, 4)  # not a linear `decoder_layer` computes
        assert layer_weights(decoder) is None


def test_scoring_goes_on_uncompiled_where_compiling_fails(recommender, tiny_dataset, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    from ccfllm import scoring_layers

    def no_compiler(*args, **kwargs):
        raise BackendCompilerFailed(no_compiler, RuntimeError("no C++ compiler"), None)

    model, builder, test = recommender.model, recommender.hybrid_prompts, tiny_dataset.test
    rows = np.arange(len(test))
    eager = score_rows(model, builder, test, rows, batch_size=4)
    monkeypatch.setattr(scoring_layers, "_compiled", {"layer": no_compiler})
    model.compile_scoring = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallen_back = score_rows(model, builder, test, rows, batch_size=4)
    finally:
        model.compile_scoring = False
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    np.testing.assert_allclose(fallen_back, eager, rtol=0, atol=1e-6)


def test_answer_probabilities_are_computed_in_float32_from_a_bf16_model(recommender):
    model = copy.deepcopy(recommender.model).to(torch.bfloat16)
    head = model.decoder_parts()[0].get_output_embeddings().weight  # (V, d), bf16
    torch.manual_seed(0)
    hidden = (torch.randn(64, head.shape[1]) * 8).to(torch.bfloat16)  # logits of tens, as in a real LM
    log_p_yes, log_p_no, _ = model.answer_log_probs(hidden)
    exact = torch.log_softmax(hidden.double() @ head.double().T, dim=-1)
    margin = exact[:, model.yes_id] - exact[:, model.no_id]
    assert (log_p_yes - log_p_no).double().sub(margin).abs().max() < 1e-4
    # bf16 logits would round the margin by up to a few hundredths: the check above can tell them apart
    rounded = torch.log_softmax((hidden @ head.T).double(), dim=-1)
    assert (rounded[:, model.yes_id] - rounded[:, model.no_id]).sub(margin).abs().max() > 1e-3


def test_training_runs_eager_attention_on_cpu_with_the_same_loss_and_gradients(
    recommender, tiny_dataset, monkeypatch
):
    model, builder, train = recommender.model, recommender.hybrid_prompts, tiny_dataset.train
    rows = np.arange(6)
    batch = builder.batch(train.uid[rows], train.iid[rows], train.history[rows], train.label[rows])
    causal_lm, decoder = model.decoder_parts()
    # uncompiled, so that the hook sees every forward (the same switch wraps compiled training, whose
    # steps test_llm.py checks against these)
    monkeypatch.setattr(model, "compile_training", False)
    seen = []
    hook = decoder.layers[0].self_attn.register_forward_hook(
        lambda module, args, output: seen.append(module.config._attn_implementation)
    )
    parameters = list(model.fusion_modules()[0].parameters())

    def loss_and_gradients(log_probs):
        model.zero_grad(set_to_none=True)
        for parameter in parameters:
            parameter.requires_grad_(True)
        answer = log_probs(model, batch)
        loss = -(answer.log_p_yes - answer.log_p_no).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in parameters])

    try:
        engine_loss, engine_grad = loss_and_gradients(type(model).forward)
        naive_loss, naive_grad = loss_and_gradients(naive_log_probs)
        with torch.no_grad():
            model(batch)
    finally:
        hook.remove()
        model.requires_grad_(False)
    assert seen == ["eager", "sdpa", "sdpa"]  # training forward, naive forward, forward without gradients
    assert causal_lm.config._attn_implementation == "sdpa"  # put back after the block
    assert abs(engine_loss - naive_loss) < 1e-5
    torch.testing.assert_close(engine_grad, naive_grad, rtol=1e-4, atol=1e-6)
    assert engine_grad.abs().max() > 1e-4  # the gradients compared are not all zero


def test_the_float32_output_weight_is_converted_once_and_again_after_a_change():
    head = torch.nn.Linear(4, 10, bias=False).to(torch.bfloat16).requires_grad_(False)
    first = float32_output_weight(head)
    assert first.dtype == torch.float32 and float32_output_weight(head) is first
    with torch.no_grad():
        head.weight.mul_(2)
    again = float32_output_weight(head)
    torch.testing.assert_close(again, 2 * first)
    head.weight.requires_grad_(True)  # a weight that trains is converted on every call, with its graph
    assert float32_output_weight(head).requires_grad


@pytest.fixture(scope="module")
def qwen2_recommender(tiny_qwen2_dir, tiny_dataset):
    """CCF-LLM on the tiny Qwen2, its LoRA and GATE moved off their zero start."""
    cf = cf_config("mf", dim=8, lr=1e-2, weight_decay=1e-4, bias_decay=1e-4, max_epochs=3, device="cpu")
    backbone = train_cf(cf, tiny_dataset, progress=False).model
    config = ccf_config(
        "cpu", llm=str(tiny_qwen2_dir), device="cpu", dtype="float32", alg_hidden=16, gate_hidden=8
    )
    torch.manual_seed(0)
    llm = load_tiny_llm(tiny_qwen2_dir, tiny_dataset.item_titles)
    built = build_recommender(config, tiny_dataset, backbone, llm)
    with torch.no_grad():
        for parameter in built.model.gate.parameters():
            parameter.normal_(0.0, 0.3)
        for layer in (m for m in built.model.modules() if isinstance(m, LoraLinear)):
            layer.lora_B["default"].weight.normal_(0.0, 0.5)
    return built


@pytest.mark.parametrize("compiled", [False, True])
def test_qwen2_engine_through_layer_functions_equals_the_naive_path(
    qwen2_recommender, tiny_dataset, monkeypatch, compiled
):
    from ccfllm import scoring_layers

    model, builder, test = qwen2_recommender.model, qwen2_recommender.hybrid_prompts, tiny_dataset.test
    assert type(model.decoder_parts()[1].layers[0]).__name__ == "Qwen2DecoderLayer"
    ran = _layers_run(monkeypatch, compiled)
    rows = np.arange(len(test))
    engine = score_rows(model, builder, test, rows, batch_size=4)  # compile_scoring: the cpu preset's
    naive = naive_score_rows(model, builder, test, rows, batch_size=5)
    assert ran and all((layer is scoring_layers.decoder_layer) != compiled for layer in ran)
    np.testing.assert_allclose(engine, naive, rtol=0, atol=1e-5)
    assert np.ptp(naive) > 1e-3


def test_int8_scoring_moves_the_scores_a_little_and_only_the_seven_linears_change(recommender, tiny_dataset):
    from ccfllm.llm_speed import merged_lora
    from ccfllm.scoring_layers import Int8Linear, int8_weights, linear

    model = copy.deepcopy(recommender.model)
    with merged_lora(model):  # the tensors scoring multiplies by
        weights = layer_weights(model.decoder_parts()[1])
    quantized = int8_weights(weights)
    kinds = [[type(item).__name__ for item in layer] for layer in quantized]
    assert all(k == ["Parameter", *["Int8Linear"] * 4, "Parameter", *["Int8Linear"] * 3] for k in kinds)
    weight, bias = weights[0][1]
    x = torch.randn(5, weight.shape[1])
    exact, rounded = torch.nn.functional.linear(x, weight, bias), linear(x, Int8Linear(weight, bias))
    assert 0 < (rounded - exact).norm() / exact.norm() < 0.05  # 8-bit weights, 7-bit activations

    test, builder, model = tiny_dataset.test, recommender.hybrid_prompts, recommender.model
    float32 = score_rows(model, builder, test)
    model.scoring_int8 = True
    try:
        int8 = score_rows(model, builder, test)
    finally:
        model.scoring_int8 = False
    assert 0 < np.abs(int8 - float32).max() < 0.01
