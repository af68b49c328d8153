"""The hybrid prompt (section 3.2): where placeholders land, truncation, batching."""

from __future__ import annotations

import numpy as np
import pytest

from ccfllm.errors import CCFLLMError
from ccfllm.prompt import ITEM, TEMPLATES, TEXT, USER, PromptBuilder
from conftest import tiny_tokenizer

TITLES = np.array(
    ["", "Alien (1979)", "Heat (1995)", "Big (1988)", "Fargo (1996)", "Up (2009)"], dtype=object
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(" ".join(TITLES[1:]))


def runs(prompt) -> list[tuple[int, list[int]]]:
    """(item id, token positions) of each run of ITEM positions, in order."""
    found = []
    for position in np.flatnonzero(prompt.kind == ITEM):
        if found and found[-1][0] == prompt.item[position] and found[-1][1][-1] == position - 1:
            found[-1][1].append(position)
        else:
            found.append((int(prompt.item[position]), [position]))
    return found


def test_placeholders_land_on_the_right_positions(tokenizer):
    builder = PromptBuilder(tokenizer, TITLES)
    prompt = builder.encode(4, [0, 1, 2, 3])
    item_runs = runs(prompt)
    assert [item for item, _ in item_runs] == [1, 2, 3, 4]  # history oldest first, then the target
    for item, positions in item_runs:
        assert tokenizer.decode(prompt.input_ids[positions].tolist()) == tokenizer.decode(
            tokenizer.encode(TITLES[item], add_special_tokens=False)
        )
    (user,) = np.flatnonzero(prompt.kind == USER)
    assert tokenizer.decode(prompt.input_ids[user - 2 : user].tolist()) == "the feature"
    after_target = prompt.input_ids[item_runs[-1][1][-1] + 1 :]
    assert after_target.tolist() == tokenizer.encode(
        '". Answer with "Yes" or "No". #Answer:', add_special_tokens=False
    )
    assert prompt.item[prompt.kind != ITEM].sum() == 0 and prompt.n_history == 3


def test_piecewise_tokens_equal_the_whole_prompt_tokenised(tokenizer):
    builder = PromptBuilder(tokenizer, TITLES)
    prompt = builder.encode(5, [2, 3])
    text = TEMPLATES["movies"].format(history='"Heat (1995)", "Big (1988)"')
    text = text.replace("[Item]", '"Up (2009)"').replace(" [User]", "")
    without_user = prompt.input_ids[prompt.kind != USER].tolist()
    assert without_user == tokenizer.encode(text, add_special_tokens=False)


def test_truncation_drops_the_oldest_history_first_and_keeps_the_question(tokenizer):
    full = PromptBuilder(tokenizer, TITLES).encode(5, [1, 2, 3, 4])
    title_and_separator = len(tokenizer.encode('Big (1988)", "', add_special_tokens=False))
    limit = len(full.input_ids) - 2 * title_and_separator  # room for two fewer history items
    cut = PromptBuilder(tokenizer, TITLES, max_tokens=limit).encode(5, [1, 2, 3, 4])
    assert len(cut.input_ids) <= limit and cut.n_history == 2
    assert [item for item, _ in runs(cut)] == [3, 4, 5]  # the two most recent, and the target
    assert tokenizer.decode(cut.input_ids[-5:].tolist()) == tokenizer.decode(full.input_ids[-5:].tolist())
    capped = PromptBuilder(tokenizer, TITLES, max_history=1).encode(5, [1, 2, 3, 4])
    assert [item for item, _ in runs(capped)] == [4, 5]


def test_too_small_a_budget_and_untitled_targets_are_refused(tokenizer):
    builder = PromptBuilder(tokenizer, TITLES, max_tokens=10)
    with pytest.raises(CCFLLMError, match="too small: the question and target item 2 alone need"):
        builder.encode(2, [1])
    with pytest.raises(CCFLLMError, match="Item 9 has no title"):
        PromptBuilder(tokenizer, TITLES).encode(9, [1])
    with pytest.raises(CCFLLMError, match="No prompt template for domain 'news'"):
        PromptBuilder(tokenizer, TITLES, domain="news")


def test_text_only_prompt_has_no_cf_positions(tokenizer):
    prompt = PromptBuilder(tokenizer, TITLES, with_cf=False).encode(5, [1, 2])
    assert (prompt.kind == TEXT).all() and (prompt.item == 0).all()
    assert "feature" not in tokenizer.decode(prompt.input_ids.tolist())


def test_batch_left_pads_so_the_last_column_is_the_answer_position(tokenizer):
    builder = PromptBuilder(tokenizer, TITLES)
    history = np.array([[0, 0, 1], [1, 2, 3]])
    batch = builder.batch([7, 8], [4, 5], history, label=[1, 0])
    short, long = (builder.encode(i, h) for i, h in zip([4, 5], history, strict=True))
    assert batch.input_ids.shape == (2, len(long.input_ids))
    assert batch.input_ids[0, -len(short.input_ids) :].tolist() == short.input_ids.tolist()
    assert batch.attention_mask[0].tolist() == [0] * (len(long.input_ids) - len(short.input_ids)) + [1] * len(
        short.input_ids
    )
    assert (batch.input_ids[:, -1] == batch.input_ids[1, -1]).all()  # both end on the same answer cue
    assert batch.history.tolist() == history.tolist() and batch.label.tolist() == [1.0, 0.0]
