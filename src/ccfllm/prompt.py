"""Hybrid prompt translation (section 3.2), tokenised once per piece and once per item title.

The paper's template, per domain. [User] is one position that will carry ALG(x_u^CF); every token of
an item's title (the target [Item] and each liked item of {history}) is a position that carries the
title token's own embedding x_i^SM[t] and the item id, for fusion with ALG(x_i^CF) (Eqs. 3-4). Titles
are quoted, as in CoLLM's prompts. Too long a prompt loses its oldest history items first; the question
and the target item are never dropped.

A prompt's tokens are the concatenation of the pieces' tokens (template text, quotes and separators,
titles), each tokenised on its own. For a BPE tokenizer this can differ at piece boundaries from
tokenising the whole string at once; it is the same for every row, in training and in scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .data.dataset import PAD
from .errors import CCFLLMError

TEXT, USER, ITEM = 0, 1, 2  # what a prompt position holds

_QUESTION = "#Question: A user has given high ratings to the following {items}: {{history}}."
_USER_FEATURE = (
    " Additionally, we have information about the user's preferences encoded in the feature [User]."
)
_ASK = (
    " Using all available information, make a prediction about whether the user would enjoy"
    ' the {item} [Item]. Answer with "Yes" or "No". #Answer:'
)
_NOUNS = {"movies": ("movies", "movie"), "books": ("books", "book")}
# Section 3.2's template; the text-only one (TALLRec, and CoLLM's first step) drops the user-feature sentence.
TEMPLATES = {d: (_QUESTION + _USER_FEATURE + _ASK).format(items=p, item=s) for d, (p, s) in _NOUNS.items()}
TEXT_TEMPLATES = {d: (_QUESTION + _ASK).format(items=p, item=s) for d, (p, s) in _NOUNS.items()}
HISTORY_OPEN, HISTORY_SEPARATOR, HISTORY_CLOSE = '"', '", "', '"'
TARGET_OPEN, TARGET_CLOSE = '"', '"'


@dataclass
class EncodedPrompt:
    input_ids: np.ndarray  # (T,) token ids; at the USER position a filler id, replaced by ALG(x_u^CF)
    kind: np.ndarray  # (T,) TEXT, USER or ITEM
    item: np.ndarray  # (T,) item id at ITEM positions, 0 elsewhere
    n_history: int  # history items the prompt shows


@dataclass
class PromptBatch:
    """Prompts left-padded into one batch: the last column is every row's answer position."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    kind: torch.Tensor  # (B, T), TEXT on padding
    item: torch.Tensor  # (B, T), 0 outside ITEM positions
    uid: torch.Tensor  # (B,)
    iid: torch.Tensor  # (B,)
    history: torch.Tensor  # (B, H) the rows' liked histories, left-padded (what sequential CF models read)
    label: torch.Tensor | None = None  # (B,) float

    def to(self, device: torch.device | str) -> PromptBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PromptBatch(**{k: v.to(device) if v is not None else None for k, v in moved.items()})


class PromptBuilder:
    def __init__(
        self,
        tokenizer,
        item_titles: np.ndarray,
        domain: str = "movies",
        max_tokens: int = 700,
        with_cf: bool = True,
        max_history: int | None = None,
    ) -> None:
        if domain not in TEMPLATES:
            raise CCFLLMError(f"No prompt template for domain {domain!r}; known: {sorted(TEMPLATES)}.")
        self.tokenizer, self.item_titles, self.domain = tokenizer, item_titles, domain
        self.max_tokens, self.with_cf, self.max_history = max_tokens, with_cf, max_history
        template = (TEMPLATES if with_cf else TEXT_TEMPLATES)[domain]
        before_history, after_history = template.split("{history}")
        before_target, after_target = after_history.split("[Item]")
        self.filler_id = next(
            i
            for i in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
            if i is not None
        )
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
        self.head = self.bos + self._tokens(before_history + HISTORY_OPEN)
        self.separator = self._tokens(HISTORY_SEPARATOR)
        middle = HISTORY_CLOSE + before_target + TARGET_OPEN
        if with_cf:
            before_user, after_user = middle.split("[User]")
            self.before_user, self.after_user = self._tokens(before_user), self._tokens(after_user)
        else:
            self.before_user, self.after_user = self._tokens(middle), []
        self.tail = self._tokens(TARGET_CLOSE + after_target)
        self._titles: dict[int, list[int]] = {}

    def fixed_length(self, iid: int) -> int:
        """Tokens of the prompt for target `iid` with an empty history: the part never dropped."""
        fixed = len(self.head) + len(self.before_user) + len(self.after_user) + len(self.tail)
        return fixed + int(self.with_cf) + len(self.title_tokens(iid, target=True))

    def title_tokens(self, iid: int, target: bool = False) -> list[int]:
        if iid not in self._titles:
            title = self.item_titles[iid] if 0 < iid < len(self.item_titles) else None
            self._titles[iid] = self._tokens(str(title)) if title else []
        if target and not self._titles[iid]:
            raise CCFLLMError(
                f"Item {iid} has no title: a target item needs one (add it to the items table)."
            )
        return self._titles[iid]

    def encode(self, iid: int, history: Sequence[int]) -> EncodedPrompt:
        """One row's prompt; `history` is liked item ids, oldest first (PAD and untitled items skipped)."""
        budget = self.max_tokens - self.fixed_length(iid)
        if budget < 0:
            raise CCFLLMError(
                f"max_tokens={self.max_tokens} is too small: the question and target item {iid} alone need "
                f"{self.fixed_length(iid)} tokens."
            )
        shown = self._history_that_fits(
            [int(i) for i in history if i != PAD and self.title_tokens(int(i))], budget
        )
        segments = [(self.head, TEXT, 0)]
        for position, liked in enumerate(shown):
            if position:
                segments.append((self.separator, TEXT, 0))
            segments.append((self.title_tokens(liked), ITEM if self.with_cf else TEXT, liked))
        segments.append((self.before_user, TEXT, 0))
        if self.with_cf:
            segments += [([self.filler_id], USER, 0), (self.after_user, TEXT, 0)]
        segments += [
            (self.title_tokens(iid, target=True), ITEM if self.with_cf else TEXT, iid),
            (self.tail, TEXT, 0),
        ]
        ids = np.concatenate([np.asarray(tokens, dtype=np.int64) for tokens, _, _ in segments])
        kind = np.concatenate([np.full(len(tokens), k, dtype=np.int8) for tokens, k, _ in segments])
        item = np.concatenate(
            [np.full(len(tokens), i if k == ITEM else 0, dtype=np.int64) for tokens, k, i in segments]
        )
        return EncodedPrompt(ids, kind, item, len(shown))

    def batch(self, uid, iid, history, label=None) -> PromptBatch:
        """Encode rows and left-pad them into one batch; `history` is the (B, H) left-padded matrix."""
        history = np.asarray(history)
        prompts = [self.encode(int(i), row) for i, row in zip(iid, history, strict=True)]
        width = max(len(p.input_ids) for p in prompts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.filler_id
        input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
        mask, kind, item = (np.zeros((len(prompts), width), dtype=np.int64) for _ in range(3))
        for row, prompt in enumerate(prompts):
            start = width - len(prompt.input_ids)
            input_ids[row, start:], mask[row, start:] = prompt.input_ids, 1
            kind[row, start:], item[row, start:] = prompt.kind, prompt.item
        return PromptBatch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            kind=torch.from_numpy(kind),
            item=torch.from_numpy(item),
            uid=torch.as_tensor(np.array(uid, dtype=np.int64)),
            iid=torch.as_tensor(np.array(iid, dtype=np.int64)),
            history=torch.as_tensor(history.astype(np.int64)),
            label=None if label is None else torch.as_tensor(np.asarray(label, dtype=np.float32)),
        )

    def _history_that_fits(self, history: list[int], budget: int) -> list[int]:
        """The most recent items (at most max_history) whose titles and separators fit in `budget`."""
        if self.max_history is not None:
            history = history[-self.max_history :] if self.max_history else []
        shown: list[int] = []
        for liked in reversed(history):
            cost = len(self.title_tokens(liked)) + (len(self.separator) if shown else 0)
            if cost > budget:
                break
            budget -= cost
            shown.append(liked)
        return shown[::-1]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
