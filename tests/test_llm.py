"""Loading causal LMs (local folders, the embedded GGUF), answer tokens, LoRA targets."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ccfllm.errors import CCFLLMError
from ccfllm.llm import (
    EMBEDDED_LLM,
    add_lora,
    answer_token_ids,
    embedded_gguf,
    llm_cache_dir,
    load_llm,
    lora_target_modules,
)
from conftest import tiny_tokenizer


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def test_lora_targets_follow_the_architecture():
    assert lora_target_modules(tiny_llama()) == ["q_proj", "v_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert lora_target_modules(gpt2) == ["c_attn"]
    with pytest.raises(CCFLLMError, match="No known attention projection"):
        lora_target_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_add_lora_trains_only_the_adapters():
    model = add_lora(tiny_llama(), r=8, alpha=16)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in trainable)
    # q and v are 32 x 32 in each of 2 layers; each gets A (8 x 32) and B (32 x 8)
    assert sum(trainable.values()) == 2 * 2 * (8 * 32 + 32 * 8)


def test_answer_tokens_are_single_and_distinct():
    tokenizer = tiny_tokenizer()
    yes, no = answer_token_ids(tokenizer)
    assert (tokenizer.convert_ids_to_tokens(yes), tokenizer.convert_ids_to_tokens(no)) == ("Yes", "No")
    with pytest.raises(CCFLLMError, match="no single token for the answer 'Maybe'"):
        answer_token_ids(tokenizer, answers=("Yes", "Maybe"))


def test_a_local_llama_folder_loads_in_the_asked_dtype(tiny_llm_dir):
    llm = load_llm(str(tiny_llm_dir), device="cpu", dtype="float32")
    assert llm.model.dtype == torch.float32 and not llm.model.training
    assert llm.fingerprint["model_type"] == "llama" and llm.hidden_size == 32
    assert llm.tokenizer.padding_side == "left"
    assert load_llm(str(tiny_llm_dir), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


def test_folders_that_are_not_causal_lms_and_hub_ids_are_refused(tmp_path):
    encoder = tmp_path / "encoder"
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["BertModel"]  # a sentence encoder's folder, like all-MiniLM-L6-v2's
    config.save_pretrained(encoder)
    with pytest.raises(
        CCFLLMError, match=r"holds a 'bert' model \(BertModel\), which is not a causal language"
    ):
        load_llm(str(encoder))
    with pytest.raises(CCFLLMError, match="holds no config.json"):
        load_llm(str(tmp_path))
    with pytest.raises(CCFLLMError, match="is not a local folder.*allow a download"):
        load_llm("some-org/some-model")


def test_the_embedded_model_loads_and_answers_yes_or_no():
    embedded_gguf()  # a clear error here if the wheel is missing
    started = time.perf_counter()
    llm = load_llm(EMBEDDED_LLM, device="cpu")  # de-quantizes into the cache on a fresh machine
    first = time.perf_counter() - started
    started = time.perf_counter()
    llm = load_llm(EMBEDDED_LLM, device="cpu")
    assert time.perf_counter() - started < max(5.0, first)  # the second load reads the cache
    assert (llm_cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert llm.fingerprint == {
        "name": EMBEDDED_LLM,
        "model_type": "llama",
        "hidden_size": 576,
        "vocab_size": 49152,
        "n_layers": 30,
    }
    prompt = '#Question: Is "Toy Story (1995)" a movie? Answer with "Yes" or "No". #Answer:'
    ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(llm.model(input_ids=ids).logits[0, -1].float(), dim=-1)
    p_yes, p_no = probs[llm.yes_id].item(), probs[llm.no_id].item()
    assert 0 < p_yes < 1 and 0 < p_no < 1 and p_yes + p_no > 0.2, (p_yes, p_no)  # the answer cue works
