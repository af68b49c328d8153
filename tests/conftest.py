"""A tiny CTR dataset built in code, with structure a CF model can learn: two taste groups of users
and items; a user likes an item of their own group with probability 0.85, another group's with 0.15."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ccfllm.data import PAD, liked_histories, load_collm_split, write_collm_split

N_USERS, N_ITEMS, ROWS_PER_USER = 48, 40, 36


def pytest_configure(config):
    """Under pytest-xdist (`-n`), the cores shared out among the workers: two workers each with all the
    cores' threads would oversubscribe them, and OpenMP threads that wait for a busy core spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def tiny_frames(seed: int = 0) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    user_group = np.arange(N_USERS + 1) % 2
    item_group = (np.arange(N_ITEMS + 1) // 2) % 2
    titles = {iid: f"Movie {iid} ({1980 + iid % 20})" for iid in range(1, N_ITEMS + 1)}
    records = []
    for uid in range(1, N_USERS + 1):
        items = rng.choice(np.arange(1, N_ITEMS + 1), size=ROWS_PER_USER, replace=False)
        for step, iid in enumerate(items):
            liked_chance = 0.85 if user_group[uid] == item_group[iid] else 0.15
            records.append((uid, int(iid), int(rng.random() < liked_chance), 1_000_000 + step * 1000 + uid))
    rows = pd.DataFrame(records, columns=["uid", "iid", "label", "timestamp"])
    rows = rows.sort_values(["uid", "timestamp"], kind="stable").reset_index(drop=True)
    rows["his"] = liked_histories(rows)
    rows["title"] = rows["iid"].map(titles)
    step = (rows["timestamp"] - 1_000_000) // 1000
    split = np.select([step < 24, step < 30], ["train", "valid"], "test")
    frames = {name: rows[split == name].reset_index(drop=True) for name in ("train", "valid", "test")}
    items = pd.DataFrame({"iid": [PAD, *titles], "title": ["", *titles.values()]})
    return frames, items


def write_tiny_split(folder: Path) -> Path:
    frames, items = tiny_frames()
    meta = {"name": "tiny", "domain": "movies", "n_users": N_USERS + 1, "n_items": N_ITEMS + 1}
    return write_collm_split(folder, frames, items, meta)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_split(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_dataset(tiny_dir):
    return load_collm_split(tiny_dir, max_history=5)


def renamed(dataset, name: str = "a copy"):
    """The same rows under another name (a copy of the data in another folder)."""
    return type(dataset)(**{**dataset.__dict__, "name": name, "source": f"/elsewhere/{name}"})


def one_label_flipped(dataset):
    """Another dataset with the same name and counts: the first train row's label flipped."""
    train = dataset.train
    label = train.label.copy()
    label[0] = 1 - label[0]
    splits = {**dataset.splits, "train": dataclasses.replace(train, label=label)}
    return type(dataset)(**{**dataset.__dict__, "splits": splits})


# -- a tiny tokenizer and a tiny randomly initialised Llama, built in code ----------------------------

TEMPLATE_WORDS = (
    '#Question: A user has given high ratings to the following movies books: "," . Additionally, we have '
    "information about the user's preferences encoded in the feature Using all available make a prediction "
    'whether would enjoy movie book Answer with "Yes" or "No" #Answer'
)


def tiny_tokenizer(extra_text: str = ""):
    """A word-level tokenizer that splits on spaces and on every punctuation mark (BERT's pre-tokeniser),
    so a prompt tokenised piece by piece equals the whole string tokenised at once."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    words = {w for w, _ in pre.pre_tokenize_str(TEMPLATE_WORDS + " " + extra_text)}
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def save_tiny_llama(folder: Path, titles, hidden_size: int = 32, kv_heads: int = 4) -> Path:
    """A randomly initialised 2-layer Llama and a tokenizer that knows `titles`, saved in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(" ".join(titles[1:]))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_qwen2(folder: Path, titles, hidden_size: int = 48, kv_heads: int = 1) -> Path:
    """A randomly initialised 2-layer Qwen2 and its tokenizer, saved in `folder`: what the 1.5B model
    has that Llama lacks, small: biases on q, k and v (random, since transformers starts them at
    zero), six query heads per key/value head, an untied output layer and Qwen's rope base."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer(" ".join(titles[1:]))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_DECODERS = {"llama": save_tiny_llama, "qwen2": save_tiny_qwen2}


def load_tiny_llm(folder: Path, titles):
    """`llm.load_llm` of a tiny decoder saved by this module, in float32 on the CPU.

    A tiny Qwen2's word-level tokenizer is built here: transformers 5 reads any tokenizer saved beside
    a Qwen2 config as Qwen2's byte-level BPE, which splits the tiny vocabulary's words apart.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ccfllm.llm import LoadedLLM, _fingerprint, answer_token_ids, load_llm

    if AutoConfig.from_pretrained(folder).model_type != "qwen2":
        return load_llm(str(folder), device="cpu", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = tiny_tokenizer(" ".join(titles[1:]))
    tokenizer.padding_side = "left"
    return LoadedLLM(
        model, tokenizer, str(folder), _fingerprint(str(folder), model), *answer_token_ids(tokenizer)
    )


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_dataset) -> Path:
    """A saved Qwen2 with hidden size 48, 2 layers and 6 query heads on one key/value head."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("llm") / "tiny-qwen2", tiny_dataset.item_titles)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tiny_dataset) -> Path:
    """A saved Llama with hidden size 32 and 2 layers, and its tokenizer, in a local folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama", tiny_dataset.item_titles)


# Settings that make a CCF-LLM (or a baseline) train in seconds on the tiny data with the tiny Llama.
TINY_CCF = dict(
    device="cpu",
    dtype="float32",
    alg_hidden=16,
    gate_hidden=8,
    batch_size=8,
    eval_batch_size=8,
    train_rows=64,
    fusion_rows=64,
    valid_rows=64,
    eval_every=4,
    epochs=1,
    lr_lora=5e-3,
    lr_fusion=5e-3,
    max_history=3,
    compile_training=False,
    compile_scoring=False,  # compiling takes seconds; tests/test_llm.py and the CLI test compile
)


@pytest.fixture(scope="module")
def backbone(tiny_dataset):
    """An MF backbone (dim 8) trained on the tiny data; one per test module, since runs freeze it."""
    from ccfllm.cf.train import train_cf
    from ccfllm.config import cf_config

    settings = dict(dim=8, lr=1e-2, weight_decay=1e-4, bias_decay=1e-4, max_epochs=5, device="cpu")
    return train_cf(cf_config("mf", **settings), tiny_dataset, progress=False).model


def stopping_on_call(function, stopping_call: int, calls: list):
    """`function`, each call counted in `calls`, raising KeyboardInterrupt (as Ctrl-C would) in place of
    call number `stopping_call` (0: never): an interruption at a chosen point of a training loop."""

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == stopping_call:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return stopping


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llm_dir, tiny_dataset) -> Path:
    """A saved two-stage CCF-LLM run on the tiny data (MF backbone), for the API and the service."""
    from ccfllm.config import ccf_config
    from ccfllm.experiment import run_ccf_llm

    quick = dict(train_rows=16, fusion_rows=16, valid_rows=32, eval_every=2)  # seconds, not a minute
    config = ccf_config("cpu", **{**TINY_CCF, **quick, "llm": str(tiny_llm_dir), "cf_model": "mf"})
    return run_ccf_llm(config, tiny_dataset, tmp_path_factory.mktemp("runs") / "ccf", progress=False).folder
