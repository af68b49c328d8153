"""The hybrid prompt (section 3.2): where placeholders land, round trips, truncation, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccfllm.errors import CCFLLMError
from ccfllm.llm_source import EMBEDDED_CACHE_NAME, llm_cache_dir
from ccfllm.prompt import ITEM, TEMPLATES, TEXT, TEXT_TEMPLATES, USER, PromptBuilder
from conftest import tiny_tokenizer

TITLES = np.array(
    [
        "",
        "Alien (1979)",
        "Heat (1995)",
        "Big (1988)",
        "Sting, The (1973)",
        "Up (2009)",
        "",
        "  Fargo (1996) ",
    ],
    dtype=object,
)
UNTITLED = 6


@pytest.fixture(scope="module")
def words():
    """Word-level: splits on spaces and every punctuation mark, so pieces never merge."""
    return tiny_tokenizer(" ".join(TITLES[1:]))


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2's pre-tokeniser) trained here on prompts, so it learns merges such as
    `)",` that cross the end of a title, as SmolLM2's vocabulary has them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    titled = [t.strip() for t in TITLES if t]
    corpus = [
        TEMPLATES["movies"].format(history=f'"{a}", "{b}"').replace("[Item]", f'"{c}"')
        for a, b, c in zip(titled, titled[1:] + titled[:1], titled[2:] + titled[:2], strict=True)
    ]
    backend.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def item_runs(prompt) -> list[tuple[int, np.ndarray]]:
    """(item id, positions) of each run of consecutive ITEM positions, in order."""
    positions = np.flatnonzero(prompt.kind == ITEM)
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(prompt.item[positions]) != 0)) + 1
    return [(int(prompt.item[run[0]]), run) for run in np.split(positions, breaks) if len(run)]


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_templates_are_section_3_2s():
    assert TEMPLATES["movies"] == (
        "#Question: A user has given high ratings to the following movies: {history}. Additionally, we have "
        "information about the user's preferences encoded in the feature [User]. Using all available "
        "information, make a prediction about whether the user would enjoy the movie [Item]. "
        'Answer with "Yes" or "No". #Answer:'
    )
    assert TEMPLATES["books"] == TEMPLATES["movies"].replace("movie", "book")
    assert TEXT_TEMPLATES["movies"] == TEMPLATES["movies"].replace(
        " Additionally, we have information about the user's preferences encoded in the feature [User].", ""
    )


def test_placeholders_land_on_the_right_positions(words):
    prompt = PromptBuilder(words, TITLES).encode(5, [0, 0, 1, 2, 4])
    assert [item for item, _ in item_runs(prompt)] == [1, 2, 4, 5]  # history oldest first, then the target
    for item, run in item_runs(prompt):
        assert prompt.input_ids[run].tolist() == tokens(words, TITLES[item])
    # The TEXT positions are the template with the titles taken out and [User] removed.
    without_titles = TEMPLATES["movies"].format(history='"", "", ""').replace("[Item]", '""')
    assert prompt.input_ids[prompt.kind == TEXT].tolist() == tokens(
        words, without_titles.replace(" [User]", "")
    )
    (user,) = np.flatnonzero(prompt.kind == USER)
    assert prompt.input_ids[user - 2 : user].tolist() == tokens(words, "the feature")
    assert prompt.input_ids[user + 1 : user + 3].tolist() == tokens(words, ". Using")
    assert prompt.input_ids[user] == words.unk_token_id  # a filler: its embedding is replaced
    target_run = item_runs(prompt)[-1][1]
    after_target = prompt.input_ids[target_run[-1] + 1 :]
    assert after_target.tolist() == tokens(words, '". Answer with "Yes" or "No". #Answer:')
    assert prompt.input_ids[target_run[0] - 3 : target_run[0]].tolist() == tokens(words, 'the movie "')
    assert prompt.item[prompt.kind != ITEM].sum() == 0 and prompt.n_history == 3
    assert prompt.history.tolist() == [1, 2, 4]


@pytest.mark.parametrize("with_cf", [True, False], ids=["hybrid", "text-only"])
@pytest.mark.parametrize("tokenizer_name", ["words", "bpe"])
def test_encode_equals_the_rendered_prompt_tokenised(tokenizer_name, with_cf, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    builder = PromptBuilder(tokenizer, TITLES, layout="fused" if with_cf else "text")
    for target, history in [(5, [2, 4]), (4, [1, 2, 3, 5]), (3, []), (7, [4])]:
        prompt = builder.encode(target, history)
        text = builder.render(target, history)
        assert (
            tokens(tokenizer, text.replace(" [User]", "")) == prompt.input_ids[prompt.kind != USER].tolist()
        )
    assert builder.render(5, [0, 2, 4]) == (TEMPLATES if with_cf else TEXT_TEMPLATES)["movies"].format(
        history='"Heat (1995)", "Sting, The (1973)"'
    ).replace("[Item]", '"Up (2009)"')


def test_item_runs_hold_the_tokens_that_merge_across_a_titles_end(bpe):
    assert len(tokens(bpe, ')",')) == 1  # the vocabulary merges across the end of a title
    prompt = PromptBuilder(bpe, TITLES).encode(5, [2, 4])
    for item, run in item_runs(prompt):
        text = bpe.decode(prompt.input_ids[run])
        assert text.startswith(TITLES[item].strip()) and set(text[len(TITLES[item].strip()) :]) <= set('",.')
    assert bpe.decode(prompt.input_ids[prompt.kind != ITEM]).count("(") == 0  # no title text is left TEXT


def test_truncation_drops_the_oldest_history_and_keeps_question_and_target(words):
    history = [1, 2, 3, 4]
    full = PromptBuilder(words, TITLES).encode(5, history)
    fixed = PromptBuilder(words, TITLES).fixed_length(5)
    full_question = full.input_ids[item_runs(full)[-1][1][0] - 16 :]  # "... the movie", the target, the rest
    shown_counts = []
    for limit in range(fixed, len(full.input_ids) + 1):
        cut = PromptBuilder(words, TITLES, max_tokens=limit).encode(5, history)
        assert len(cut.input_ids) <= limit
        assert cut.history.tolist() == history[len(history) - cut.n_history :]  # the most recent ones
        assert [item for item, _ in item_runs(cut)] == [*cut.history.tolist(), 5]
        assert cut.input_ids[-len(full_question) :].tolist() == full_question.tolist()
        assert cut.input_ids[:14].tolist() == full.input_ids[:14].tolist()  # "#Question: ... movies:"
        shown_counts.append(cut.n_history)
    assert shown_counts[0] == 0 and shown_counts[-1] == 4 and shown_counts == sorted(shown_counts)
    assert set(shown_counts) == {0, 1, 2, 3, 4}


def test_max_history_keeps_the_most_recent_titled_items_first(words):
    capped = PromptBuilder(words, TITLES, max_history=2)
    assert capped.encode(5, [1, 2, 3, UNTITLED, 4]).history.tolist() == [3, 4]
    assert PromptBuilder(words, TITLES, max_history=0).encode(5, [1, 2]).n_history == 0


def test_too_small_a_budget_is_refused_with_the_tokens_needed(words):
    fixed = PromptBuilder(words, TITLES).fixed_length()
    with pytest.raises(CCFLLMError, match=f"fixed part of the prompt needs {fixed} tokens"):
        PromptBuilder(words, TITLES, max_tokens=fixed)
    short_target = PromptBuilder(words, TITLES).fixed_length(5)  # "Up (2009)"
    builder = PromptBuilder(words, TITLES, max_tokens=short_target)
    with pytest.raises(CCFLLMError, match=f"target item 4 .* needs {builder.fixed_length(4)} tokens"):
        builder.encode(4, [1])  # "Sting, The (1973)" is longer
    assert len(builder.encode(5, [1]).input_ids) == short_target


def test_unknown_items_and_untitled_targets_are_errors_untitled_history_is_skipped(words):
    builder = PromptBuilder(words, TITLES)
    with pytest.raises(CCFLLMError, match="Item id 99 is outside the items table"):
        builder.encode(99, [1])
    with pytest.raises(CCFLLMError, match="Item id 42 is outside the items table"):
        builder.encode(1, [42])
    with pytest.raises(CCFLLMError, match="Target item 6 has no title"):
        builder.encode(UNTITLED, [1])
    assert builder.encode(1, [2, UNTITLED, 3]).history.tolist() == [2, 3]
    assert builder.render(7, []).endswith('the movie "Fargo (1996)". Answer with "Yes" or "No". #Answer:')
    with pytest.raises(CCFLLMError, match="No prompt template for domain 'news'"):
        PromptBuilder(words, TITLES, domain="news")


def test_an_empty_history_is_an_empty_quote(words):
    builder = PromptBuilder(words, TITLES)
    assert 'following movies: "". Additionally' in builder.render(3, [0, 0, UNTITLED])
    assert len(builder.encode(3, []).input_ids) == builder.fixed_length(3)


def test_text_only_prompt_has_no_cf_positions(words):
    prompt = PromptBuilder(words, TITLES, layout="text").encode(5, [1, 2])
    assert (prompt.kind == TEXT).all() and (prompt.item == 0).all()
    assert "feature" not in words.decode(prompt.input_ids)
    hybrid = PromptBuilder(words, TITLES).encode(5, [1, 2])
    assert prompt.input_ids[-20:].tolist() == hybrid.input_ids[-20:].tolist()  # same title tokens


def test_bos_starts_the_prompt_when_the_tokenizer_adds_one(words):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = words.backend_tokenizer.__class__.from_str(words.backend_tokenizer.to_str())
    backend.add_special_tokens(["[BOS]"])
    bos = backend.token_to_id("[BOS]")
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]"
    )
    builder = PromptBuilder(with_bos, TITLES)
    prompt = builder.encode(5, [1, 2])
    assert prompt.input_ids[0] == bos and (prompt.input_ids == bos).sum() == 1
    without_user = prompt.input_ids[prompt.kind != USER].tolist()
    assert without_user == tokens(with_bos, builder.render(5, [1, 2]).replace(" [User]", ""))
    assert PromptBuilder(words, TITLES).encode(5, [1, 2]).input_ids[0] != bos  # no BOS when none is added


def test_a_tokenizer_without_offsets_gives_the_same_prompt(words):
    class NoOffsets:
        """A Python (slow) tokenizer: same tokens, no character offsets."""

        is_fast = False

        def __getattr__(self, name):
            return getattr(words, name)

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return words(text, **kwargs)

    fast, slow = (
        PromptBuilder(words, TITLES).encode(4, [1, 2]),
        PromptBuilder(NoOffsets(), TITLES).encode(4, [1, 2]),
    )
    for field in ("input_ids", "kind", "item"):
        assert getattr(slow, field).tolist() == getattr(fast, field).tolist()


def test_batch_left_pads_so_the_last_column_is_the_answer_position(words):
    builder = PromptBuilder(words, TITLES, max_history=2)
    history = np.array([[0, 0, 1], [1, 2, 3], [0, UNTITLED, 2]])
    batch = builder.batch([7, 8, 9], [4, 5, 3], history, label=[1, 0, 1])
    prompts = [builder.encode(i, h) for i, h in zip([4, 5, 3], history, strict=True)]
    width = max(len(p.input_ids) for p in prompts)
    assert batch.input_ids.shape == batch.kind.shape == batch.item.shape == (3, width)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        assert batch.input_ids[row, -n:].tolist() == prompt.input_ids.tolist()
        assert batch.kind[row, -n:].tolist() == prompt.kind.tolist()
        assert batch.item[row, -n:].tolist() == prompt.item.tolist()
        assert batch.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        assert (batch.input_ids[row, : width - n] == words.pad_token_id).all()
        assert (batch.kind[row, : width - n] == TEXT).all()
    assert batch.input_ids[:, -1].tolist() == [tokens(words, ":")[0]] * 3  # every row ends on "#Answer:"
    assert batch.history.tolist() == [[0, 0, 1], [0, 2, 3], [0, 0, 2]]  # what each prompt shows
    assert batch.uid.tolist() == [7, 8, 9] and batch.iid.tolist() == [4, 5, 3]
    assert batch.label.dtype == torch.float32 and batch.label.tolist() == [1.0, 0.0, 1.0]
    assert builder.batch([7], [4], history[:1]).label is None
    assert batch.to("cpu").input_ids.tolist() == batch.input_ids.tolist()


def test_the_embedded_smollm2_tokenizer_gives_the_whole_prompts_tokens():
    """On SmolLM2's byte-level BPE the pieces, cut where a space starts a word, tokenise exactly as the
    whole prompt string does, titles with commas, apostrophes and accents included."""
    folder = llm_cache_dir() / EMBEDDED_CACHE_NAME
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no embedded SmolLM2 tokenizer cached at {folder}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    titles = np.array(
        [
            "",
            "Sting, The (1973)",
            "'Til There Was You (1997)",
            "Amélie (2001)",
            "$1,000,000 Duck (1971)",
            "Up (2009)",
        ],
        dtype=object,
    )
    for with_cf in (True, False):
        builder = PromptBuilder(tokenizer, titles, layout="fused" if with_cf else "text")
        for target, history in [(5, [1, 2, 3, 4]), (1, [5]), (2, [])]:
            prompt = builder.encode(target, history)
            text = builder.render(target, history).replace(" [User]", "")
            assert tokens(tokenizer, text) == prompt.input_ids[prompt.kind != USER].tolist()
            assert [item for item, _ in item_runs(prompt)] == ([*history, target] if with_cf else [])
