"""Hybrid prompt translation (section 3.2): token ids, and the positions where CF embeddings go.

A row (u, i, history) becomes the paper's template with the history and the target item written as
their titles. Positions are of three kinds:

- TEXT: an ordinary token of the question;
- USER: the [User] placeholder, ONE position whose embedding will be ALG(x_u^CF) (Eq. 2);
- ITEM: every token of an item's title, carrying the title token's own id (its embedding is
  x_i^SM[t]) and the item id, so that the title tokens are fused with ALG(x_i^CF) (Eqs. 3-4): the
  paper's "single token represents the two modalities for each item".
- ITEM_SLOT (layout 'slots', CoLLM's [text_i][emb_i]): the title tokens stay TEXT and one extra
  position right after the closing quote carries the item id; its embedding is ALG(x_i^CF).

How the text is written. Titles are quoted and separated by ", ", as CoLLM writes them
(`"Heat (1995)", "Big (1988)"`; the target too: `enjoy the movie "Up (2009)".`): ML-1M titles contain
commas ("Sting, The (1973)"), which the quotes delimit. An empty history is an empty quote, `""`. Titles
are stripped of surrounding spaces; a history item with an empty title is left out (CoLLM does the
same), a target item without one is an error.

How it is tokenised, fast. The prompt is cut into pieces at spaces, each tokenised once: the fixed
text of the template, and per item ` "Title",` or ` "Title".` (its quotes and the punctuation that
follows it, cached per item). Cutting where a space starts a word is where byte-level BPE
pre-tokenisers (GPT-2, SmolLM2, Llama 3) split the text anyway, so the concatenated ids equal those
of tokenising the whole prompt string at once; carrying the quotes and the comma or full stop in the
item's piece keeps the merges that cross the end of a title (`)",` is one SmolLM2 token). A token is
an ITEM position when its characters overlap the title's. Each piece but the first is tokenised
after a "\\n" marker that is then removed, so that tokenizers which prepend a space to every input
(sentencepiece) do not add one inside the prompt. The [User] placeholder with its leading space is
replaced by the USER position: the ids without that position equal the tokens of the prompt string
without " [User]". The tokenizer's BOS starts the prompt when the tokenizer adds one to its inputs
(Llama's sentencepiece does, SmolLM2 does not); no EOS is added.

Too long a prompt loses its oldest history items first; the question and the target are never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .data.dataset import PAD
from .errors import CCFLLMError

TEXT, USER, ITEM, ITEM_SLOT = 0, 1, 2, 3  # what a prompt position holds

_NOUNS = {"movies": ("movies", "movie"), "books": ("books", "book")}  # domain -> (plural, singular)
_QUESTION = "#Question: A user has given high ratings to the following {items}: {{history}}."
_USER_SENTENCE = (
    " Additionally, we have information about the user's preferences encoded in the feature [User]."
)
_ASK = (
    " Using all available information, make a prediction about whether the user would enjoy the {item}"
    ' [Item]. Answer with "Yes" or "No". #Answer:'
)
# Section 3.2's template, per domain.
TEMPLATES = {d: (_QUESTION + _USER_SENTENCE + _ASK).format(items=p, item=s) for d, (p, s) in _NOUNS.items()}
# The text-only prompt (TALLRec; CoLLM's first stage): the same words without the user-feature sentence,
# so that what the text-only stage learns reads the same question in the hybrid stage.
TEXT_TEMPLATES = {d: (_QUESTION + _ASK).format(items=p, item=s) for d, (p, s) in _NOUNS.items()}
# The pilot study's prompt (section 4.2, Table 2): the user-feature sentence replaced by collaborative
# signal written as text, the titles of the user's top items by a CF model.
_SIMILAR_SENTENCE = (
    " Additionally, we have information that users like these {items} may also enjoy: {{similar}}."
)
CF_TEXT_TEMPLATES = {
    d: (_QUESTION + _SIMILAR_SENTENCE + _ASK).format(items=p, item=s) for d, (p, s) in _NOUNS.items()
}

# What a prompt holds, by layout: no CF position ('text', TALLRec's); the user position and CF in the
# title tokens ('fused', section 3.2); the user position and one extra slot per item ('slots', CoLLM's);
# no CF position, a CF model's top items written as titles ('cf-text', Table 2).
LAYOUTS = ("text", "fused", "slots", "cf-text")

QUOTE, SEPARATOR = '"', ","
SLOT_TEXT = " [ItemCF]"  # how `render` shows an ITEM_SLOT position
EMPTY_HISTORY = QUOTE + QUOTE  # what a row without liked items shows: `the following movies: "".`
_MARKER = "\n"  # tokenised before a piece and removed, so that no prefix space lands inside the prompt


@dataclass
class EncodedPrompt:
    input_ids: np.ndarray  # (T,) int64; title ids at ITEM positions, a filler id at the USER position
    kind: np.ndarray  # (T,) int8: TEXT, USER or ITEM
    item: np.ndarray  # (T,) int64: item id at ITEM positions, 0 elsewhere
    n_history: int  # history items the prompt shows
    history: np.ndarray  # (n_history,) int64: the item ids it shows, oldest first
    prefix_length: int = 0  # tokens before the target item's piece: the part that depends on (u, history)

    def prefix(self) -> EncodedPrompt:
        """Everything before the target item: rows of one user with one shown history share it."""
        return self._cut(slice(0, self.prefix_length))

    def suffix(self) -> EncodedPrompt:
        """The target item's quoted title and the answer tail, to run on top of the prefix's cache."""
        return self._cut(slice(self.prefix_length, None))

    def _cut(self, span: slice) -> EncodedPrompt:
        return EncodedPrompt(
            self.input_ids[span], self.kind[span], self.item[span], self.n_history, self.history, 0
        )


@dataclass
class PromptBatch:
    """Prompts left-padded into one batch: the last column is every row's answer position."""

    input_ids: torch.Tensor  # (B, T) long, pad id on padding
    attention_mask: torch.Tensor  # (B, T) long, 0 on padding
    kind: torch.Tensor  # (B, T) long, TEXT on padding
    item: torch.Tensor  # (B, T) long, 0 outside ITEM positions
    uid: torch.Tensor  # (B,) long
    iid: torch.Tensor  # (B,) long
    history: torch.Tensor  # (B, H) long: the history each prompt shows, left-padded with PAD
    label: torch.Tensor | None = None  # (B,) float

    def to(self, device: torch.device | str) -> PromptBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PromptBatch(**{k: v.to(device) if v is not None else None for k, v in moved.items()})


@dataclass(frozen=True)
class _Piece:
    """A run of prompt positions, tokenised once and reused in every prompt that contains it."""

    ids: np.ndarray  # (n,) int64
    kind: np.ndarray  # (n,) int8
    item: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.ids)


class PromptBuilder:
    """Encodes rows into prompts of one of the LAYOUTS, at most `max_tokens` long; the 'cf-text' layout
    lists each user's `similar_items`."""

    def __init__(
        self,
        tokenizer,
        item_titles: np.ndarray,
        domain: str = "movies",
        max_tokens: int = 700,
        layout: str = "fused",
        max_history: int | None = None,
        similar_items: dict[int, list[int]] | None = None,
    ) -> None:
        if domain not in TEMPLATES:
            raise CCFLLMError(f"No prompt template for domain {domain!r}; known: {sorted(TEMPLATES)}.")
        if layout not in LAYOUTS:
            raise CCFLLMError(f"Unknown prompt layout {layout!r}; choose one of {list(LAYOUTS)}.")
        if max_history is not None and max_history < 0:
            raise CCFLLMError(f"max_history must be >= 0 or None, got {max_history}.")
        if (layout == "cf-text") != (similar_items is not None):
            raise CCFLLMError("The 'cf-text' layout, and only it, lists each user's similar_items.")
        self.tokenizer, self.item_titles, self.domain = tokenizer, item_titles, domain
        self.max_tokens, self.layout, self.max_history = max_tokens, layout, max_history
        self.with_cf = layout in ("fused", "slots")  # the prompt has the [User] position
        self.cf_slots = layout == "slots"
        self.similar_items = similar_items  # uid -> item ids: the pilot study's CF-as-text prompt
        self.filler_id = _filler_id(tokenizer)
        self.pad_id = next(
            i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, self.filler_id) if i is not None
        )
        self._marker_ids = tokenizer.encode(_MARKER, add_special_tokens=False)
        self._with_offsets = bool(getattr(tokenizer, "is_fast", False))
        self._items: dict[tuple[int, str], _Piece] = {}
        self._cut_template(self._template())
        if self.fixed_length() >= max_tokens:
            raise CCFLLMError(
                f"max_tokens={max_tokens} is too small: the fixed part of the prompt needs "
                f"{self.fixed_length()} tokens before the target item's title."
            )

    def _template(self) -> str:
        if self.similar_items is not None:
            return CF_TEXT_TEMPLATES[self.domain]
        return (TEMPLATES if self.with_cf else TEXT_TEMPLATES)[self.domain]

    def _cut_template(self, template: str) -> None:
        """The template's text pieces, cut at the spaces before the history, the [User] and the [Item]."""
        before_history, after_history = template.split("{history}")
        between, after_target = after_history.split("[Item]")
        # The punctuation right after a placeholder goes into the item's piece (see the module docstring).
        self.history_close, self.target_close = after_history[0], after_target[0]
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]
        head_ids = ([bos] if adds_bos else []) + self.tokenizer.encode(
            before_history.rstrip(" "), add_special_tokens=False
        )
        self.head = _text_piece(head_ids)
        between = between[1:].rstrip(" ")
        if self.with_cf:
            before_user, after_user = between.split(" [User]")
            self.middle = [
                self.text_piece(before_user),
                user_piece(self.filler_id),
                self.text_piece(after_user),
            ]
        elif self.similar_items is not None:  # the user's list goes between these two
            before_similar, after_similar = between.split("{similar}")
            self.similar_close = after_similar[0]
            self.middle = [self.text_piece(before_similar.rstrip(" ")), self.text_piece(after_similar[1:])]
        else:
            self.middle = [self.text_piece(between)]
        self.tail = self.text_piece(after_target[1:])
        self.empty_history = self.text_piece(f" {EMPTY_HISTORY}{self.history_close}")

    def fixed_length(self, iid: int | None = None, uid: int | None = None) -> int:
        """Tokens of the prompt for target `iid` (and user `uid`) with an empty history: the part never
        dropped. Without `iid`, the tokens of that prompt outside the target's piece (its quoted title)."""
        fixed = len(self.head) + len(self.empty_history) + sum(map(len, self.middle)) + len(self.tail)
        fixed += sum(map(len, self._similar_pieces(uid, strict=False)))
        return fixed if iid is None else fixed + len(self._target_piece(iid))

    def encode(self, iid: int, history: Sequence[int], uid: int | None = None) -> EncodedPrompt:
        """One row's prompt; `history` holds liked item ids, oldest first (PAD entries ignored); `uid`
        only matters to the CF-as-text prompt."""
        target, shown = self._target_piece(iid), self._shown_history(iid, history, uid)
        middle = [self.middle[0], *self._similar_pieces(uid), *self.middle[1:]]
        pieces = [self.head, *self._history_pieces(shown), *middle, target, self.tail]
        ids = np.concatenate([p.ids for p in pieces])
        return EncodedPrompt(
            input_ids=ids,
            kind=np.concatenate([p.kind for p in pieces]),
            item=np.concatenate([p.item for p in pieces]),
            n_history=len(shown),
            history=np.asarray(shown, dtype=np.int64),
            prefix_length=len(ids) - len(target) - len(self.tail),
        )

    def render(self, iid: int, history: Sequence[int], uid: int | None = None) -> str:
        """The prompt `encode` gives, as text, without the BOS; "[User]" marks the USER position."""
        shown = self._shown_history(iid, history, uid)
        similar = ", ".join(f"{QUOTE}{self._title(i)}{QUOTE}" for i in self._similar(uid)) or EMPTY_HISTORY
        slot = SLOT_TEXT if self.cf_slots else ""
        titles = ", ".join(f"{QUOTE}{self._title(i)}{QUOTE}{slot}" for i in shown) or EMPTY_HISTORY
        target = f"{QUOTE}{self._title(int(iid))}{QUOTE}{slot}"
        text = self._template().replace("{history}", titles).replace("[Item]", target)
        return text.replace("{similar}", similar)

    def batch(self, uid, iid, history, label=None) -> PromptBatch:
        """Encode rows and left-pad them into one batch; `history` is the (B, H) left-padded matrix."""
        history = np.asarray(history, dtype=np.int64)
        prompts = [self.encode(int(i), row, int(u)) for u, i, row in zip(uid, iid, history, strict=True)]
        return collate(prompts, uid, iid, self.pad_id, history.shape[1], label)

    # -- the history ------------------------------------------------------------------------------

    def _shown_history(self, iid: int, history: Sequence[int], uid: int | None = None) -> list[int]:
        """The most recent titled items (at most max_history) whose pieces fit beside the fixed part."""
        fixed = self.fixed_length(int(iid), uid)
        if fixed > self.max_tokens:
            raise CCFLLMError(
                f"max_tokens={self.max_tokens} is too small: the fixed part of the prompt for target item "
                f"{iid} (question and target title) needs {fixed} tokens."
            )
        titled = [i for i in (int(i) for i in history if i != PAD) if self._title(i)]
        if self.max_history is not None:
            titled = titled[-self.max_history :] if self.max_history else []
        budget = self.max_tokens - (fixed - len(self.empty_history))
        shown: list[int] = []
        for liked in reversed(titled):  # most recent first: it is the one that ends the list
            cost = len(self.item_piece(liked, self.history_close if not shown else SEPARATOR))
            if cost > budget:
                break
            budget -= cost
            shown.append(liked)
        return shown[::-1]

    def _history_pieces(self, shown: list[int]) -> list[_Piece]:
        if not shown:
            return [self.empty_history]
        return [self.item_piece(i, SEPARATOR) for i in shown[:-1]] + [
            self.item_piece(shown[-1], self.history_close)
        ]

    def _similar(self, uid: int | None, strict: bool = True) -> list[int]:
        """The titled similar items of `uid`; with `strict`, a missing uid is an error, else no items."""
        if self.similar_items is None:
            return []
        if uid is None:
            if strict:
                raise CCFLLMError("The CF-as-text prompt lists a user's similar items: encode needs the uid.")
            return []
        return [i for i in self.similar_items.get(int(uid), []) if self._title(i)]

    def _similar_pieces(self, uid: int | None, strict: bool = True) -> list[_Piece]:
        """` "Title",` per similar item, the last one closed like the sentence; `""` for none."""
        if self.similar_items is None:
            return []
        similar = self._similar(uid, strict)
        if not similar:
            return [self.text_piece(f" {EMPTY_HISTORY}{self.similar_close}")]
        closes = [SEPARATOR] * (len(similar) - 1) + [self.similar_close]
        return [self.item_piece(i, close) for i, close in zip(similar, closes, strict=True)]

    # -- items --------------------------------------------------------------------------------------

    def title_tokens(self, iid: int) -> np.ndarray:
        """The ids of an item's title tokens as its prompts carry them (the ITEM positions of the
        fused prompt). An item without a title has none."""
        if not self._title(int(iid)):
            return np.zeros(0, dtype=np.int64)
        start = len(f" {QUOTE}")
        title = self._title(int(iid))
        ids, in_title = self._tokens_in_span(f" {QUOTE}{title}{QUOTE}{SEPARATOR}", start, start + len(title))
        return ids[in_title]

    def title(self, iid: int) -> str:
        """The item's title as prompts show it (stripped); "" when it has none."""
        return self._title(iid)

    def _title(self, iid: int) -> str:
        """The item's title, stripped; "" when it has none. An id outside the table is an error."""
        if not 0 < iid < len(self.item_titles):
            raise CCFLLMError(
                f"Item id {iid} is outside the items table (ids 1..{len(self.item_titles) - 1}): "
                "the rows and the titles come from different datasets."
            )
        title = self.item_titles[iid]
        return title.strip() if isinstance(title, str) else ""

    def _target_piece(self, iid: int) -> _Piece:
        if not self._title(int(iid)):
            raise CCFLLMError(
                f"Target item {iid} has no title; a prompt needs one (add it to the items table)."
            )
        return self.item_piece(int(iid), self.target_close)

    def item_piece(self, iid: int, close: str) -> _Piece:
        """` "Title"` and the punctuation after it, tokenised once per (item, punctuation)."""
        key = (iid, close)
        if key not in self._items:
            title = self._title(iid)
            start = len(f" {QUOTE}")
            if self.cf_slots:  # ` "Title"`, the slot, then the punctuation on its own
                text = f" {QUOTE}{title}{QUOTE}"
                ids, _ = self._tokens_in_span(text, 0, 0)
                self._items[key] = _concat(
                    [_text_piece(ids), _slot_piece(self.filler_id, iid), self.text_piece(close)]
                )
            else:
                text = f" {QUOTE}{title}{QUOTE}{close}"
                ids, in_title = self._tokens_in_span(text, start, start + len(title))
                is_item = in_title & self.with_cf
                self._items[key] = _Piece(
                    ids=ids,
                    kind=np.where(is_item, ITEM, TEXT).astype(np.int8),
                    item=np.where(is_item, iid, 0).astype(np.int64),
                )
        return self._items[key]

    # -- tokenising pieces ------------------------------------------------------------------------

    def text_piece(self, text: str) -> _Piece:
        """A run of fixed text as it reads inside a prompt."""
        return _text_piece(self._tokens_in_span(text, 0, 0)[0])

    def _tokens_in_span(self, text: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of `text` as it reads inside a prompt, and which of them overlap characters [start, end)."""
        if not self._with_offsets:
            # No offsets (a Python tokenizer): tokenise the span and its surroundings apart.
            parts = [
                self._piece_ids(text[:start]),
                self._piece_ids(text[start:end]),
                self._piece_ids(text[end:]),
            ]
            in_span = np.concatenate([np.full(len(p), k == 1) for k, p in enumerate(parts)]).astype(bool)
            return np.asarray(sum(parts, []), dtype=np.int64), in_span
        encoding = self.tokenizer(_MARKER + text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans, shift = encoding["input_ids"], encoding["offset_mapping"], len(_MARKER)
        marked = len(self._marker_ids)
        if ids[:marked] != self._marker_ids:  # the marker merged with the text: tokenise it bare
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, spans, shift, marked = encoding["input_ids"], encoding["offset_mapping"], 0, 0
        in_span = [a - shift < end and b - shift > start for a, b in spans[marked:]]
        return np.asarray(ids[marked:], dtype=np.int64), np.asarray(in_span, dtype=bool)

    def _piece_ids(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.tokenizer.encode(_MARKER + text, add_special_tokens=False)
        if ids[: len(self._marker_ids)] == self._marker_ids:
            return ids[len(self._marker_ids) :]
        return self.tokenizer.encode(text, add_special_tokens=False)


def collate(
    prompts: Sequence[EncodedPrompt], uid, iid, pad_id: int, history_width: int, label=None
) -> PromptBatch:
    """Left-pad encoded prompts (or their prefixes or suffixes) into one batch."""
    rows, width = len(prompts), max(len(p.input_ids) for p in prompts)
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask, kind, item = (np.zeros((rows, width), dtype=np.int64) for _ in range(3))
    shown = np.full((rows, history_width), PAD, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt.input_ids)
        input_ids[row, start:], mask[row, start:] = prompt.input_ids, 1
        kind[row, start:], item[row, start:] = prompt.kind, prompt.item
        if prompt.n_history:
            shown[row, -prompt.n_history :] = prompt.history
    return PromptBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        kind=torch.from_numpy(kind),
        item=torch.from_numpy(item),
        uid=torch.as_tensor(np.array(uid, dtype=np.int64)),
        iid=torch.as_tensor(np.array(iid, dtype=np.int64)),
        history=torch.from_numpy(shown),
        label=None if label is None else torch.as_tensor(np.array(label, dtype=np.float32)),
    )


def _text_piece(ids) -> _Piece:
    ids = np.asarray(ids, dtype=np.int64)
    return _Piece(
        ids=ids, kind=np.full(len(ids), TEXT, dtype=np.int8), item=np.zeros(len(ids), dtype=np.int64)
    )


def _slot_piece(filler_id: int, iid: int) -> _Piece:
    return _Piece(
        ids=np.array([filler_id], dtype=np.int64),
        kind=np.array([ITEM_SLOT], dtype=np.int8),
        item=np.array([iid], dtype=np.int64),
    )


def _concat(pieces: list[_Piece]) -> _Piece:
    return _Piece(
        ids=np.concatenate([p.ids for p in pieces]),
        kind=np.concatenate([p.kind for p in pieces]),
        item=np.concatenate([p.item for p in pieces]),
    )


def user_piece(filler_id: int) -> _Piece:
    return _Piece(
        ids=np.array([filler_id], dtype=np.int64),
        kind=np.array([USER], dtype=np.int8),
        item=np.zeros(1, dtype=np.int64),
    )


def _filler_id(tokenizer) -> int:
    """The id at the USER position (its embedding is replaced): unk, as CoLLM does, else pad or eos."""
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise CCFLLMError("The tokenizer has no unk, pad or end-of-sequence token to hold the [User] position.")
