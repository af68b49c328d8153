"""A-LLMRec's prompt (stage 2): the user's representation, the liked history and the candidates as titles
each followed by its joint embedding's slot, and the answer, the next item's title in quotes; built from
prompt.py's pieces (CoLLM-style slots). Without the soft parts, the same words for the LLM alone.
"""

from __future__ import annotations

import numpy as np

from .data.dataset import PAD
from .prompt import EncodedPrompt, PromptBuilder, collate, user_piece

# A-LLMRec's prompt: the user's representation, the history and the candidates as titles each followed
# by its joint embedding, and the answer: the next item's title, in quotes.
STAGE2_TEMPLATE = (
    "[UserRep] is a user representation. This user has watched {history} in the past. Recommend a {item} "
    "for this user to watch next from the following set of {item} titles, {candidates}. The recommendation is"
)


GENRE_QUESTION = "Specify the genres this user would enjoy."


class NextItemPrompts:
    """Token ids and CF positions of A-LLMRec's prompt (prompt.py's pieces, with CoLLM-style slots).
    With `soft=False`, the same words without the user sentence and the slots: the LLM alone."""

    def __init__(self, tokenizer, item_titles, item: str = "movie", max_history: int = 10, soft: bool = True):
        self.pieces = PromptBuilder(tokenizer, item_titles, layout="slots" if soft else "text")
        self.max_history = max_history
        template = (
            STAGE2_TEMPLATE if soft else STAGE2_TEMPLATE.replace("[UserRep] is a user representation. ", "")
        )
        before, rest = template.format(item=item, history="{history}", candidates="{candidates}").split(
            "{history}"
        )
        middle, tail = rest.split("{candidates}")
        if soft:
            after_user = before.split("[UserRep]")[1]
            self.head = [user_piece(self.pieces.filler_id), self.pieces.text_piece(after_user.rstrip(" "))]
        else:
            self.head = [self.pieces.text_piece(before.rstrip(" "))]
        self.middle, self.tail = self.pieces.text_piece(middle.rstrip(" ")), self.pieces.text_piece(tail)

    def encode(self, history: np.ndarray, candidates: np.ndarray) -> EncodedPrompt:
        """The prompt for one row: the most recent `max_history` liked items, then the candidates."""
        shown = self._shown(history)
        pieces = [
            *self.head,
            *self._listed(shown, ""),
            self.middle,
            *self._listed(list(candidates), ""),
            self.tail,
        ]
        return _encoded(pieces)

    def encode_question(self, history: np.ndarray, question: str) -> EncodedPrompt:
        """The user part of the prompt (representation and history) followed by a free question: A-LLMRec's
        language-generation use, e.g. "Specify the genres this user would enjoy." """
        pieces = [
            *self.head,
            *self._listed(self._shown(history), ""),
            self.pieces.text_piece(f" in the past. {question}"),
        ]
        return _encoded(pieces)

    def answer_ids(self, iid: int) -> np.ndarray:
        """The tokens of ` "Title"` as the answer after "The recommendation is"."""
        return self.pieces.text_piece(f' "{self.pieces.title(int(iid))}"').ids

    def _shown(self, history: np.ndarray) -> list[int]:
        """The most recent liked items the prompt shows; an untitled one is left out, as in CCF-LLM's
        prompt (no history at all reads `""`)."""
        return [int(i) for i in history if i != PAD and self.pieces.title(int(i))][-self.max_history :]

    def _listed(self, items: list[int], close: str) -> list:
        if not items:
            return [self.pieces.text_piece(' ""')]
        closes = [","] * (len(items) - 1) + [close]
        return [self.pieces.item_piece(i, c) for i, c in zip(items, closes, strict=True)]


def _encoded(pieces: list) -> EncodedPrompt:
    return EncodedPrompt(
        input_ids=np.concatenate([p.ids for p in pieces]),
        kind=np.concatenate([p.kind for p in pieces]),
        item=np.concatenate([p.item for p in pieces]),
        n_history=0,
        history=np.zeros(0, dtype=np.int64),
    )


def answered(prompts: NextItemPrompts, history: np.ndarray, candidates: np.ndarray, target: np.ndarray):
    """Prompts with their answer (the target's quoted title) appended, left-padded; answer lengths."""
    full, lengths = [], []
    for h, c, t in zip(history, candidates, target, strict=True):
        prompt, answer = prompts.encode(h, c), prompts.answer_ids(t)
        zeros = np.zeros(len(answer), dtype=np.int64)
        full.append(
            EncodedPrompt(
                np.concatenate([prompt.input_ids, answer]),
                np.concatenate([prompt.kind, zeros.astype(np.int8)]),
                np.concatenate([prompt.item, zeros]),
                0,
                np.zeros(0, dtype=np.int64),
            )
        )
        lengths.append(len(answer))
    return collate(full, np.zeros(len(full)), target, prompts.pieces.pad_id, 0), lengths
