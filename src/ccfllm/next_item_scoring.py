"""Ranking a next-item split's candidates with a trained A-LLMRec (or its TALLRec baseline): each
candidate's title scored after the prompt, on a key/value cache shared by a row's candidates, and the
naive path that runs every (prompt, candidate) whole, the tests' oracle.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .data.next_item import NextItemSplit
from .engine import cache_argument
from .methods.allmrec import ALLMRec
from .methods.ccf_llm import positions_from_mask, run_decoder
from .next_item_prompt import NextItemPrompts, answered
from .prompt import collate


@torch.no_grad()
def candidate_scores(
    model: ALLMRec,
    prompts: NextItemPrompts,
    split: NextItemSplit,
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """Each candidate's mean log-probability per token of its quoted title after the prompt (A-LLMRec
    names an item by title; the mean keeps long titles from losing by length). The prompt runs once per
    row and its cache is copied to the row's candidates. -> (N, C)"""
    model.eval()
    device = next(model.user_projection.parameters()).device
    decoder = model.decoder()
    n_candidates = split.candidates.shape[1]
    scores = []
    for start in tqdm(range(0, len(split), batch_size), desc="rank candidates", disable=not progress):
        rows = slice(start, start + batch_size)
        history, candidates = split.history[rows], split.candidates[rows]
        encoded = [prompts.encode(h, c) for h, c in zip(history, candidates, strict=True)]
        prefix = collate(
            encoded, np.zeros(len(encoded)), np.zeros(len(encoded)), prompts.pieces.pad_id, 0
        ).to(device)
        cache = DynamicCache()
        with_cache = {cache_argument(decoder): cache, "use_cache": True}
        last = decoder(
            inputs_embeds=model.input_embeddings(prefix, torch.as_tensor(history, device=device)),
            attention_mask=prefix.attention_mask,
            position_ids=positions_from_mask(prefix.attention_mask),
            **with_cache,
        ).last_hidden_state[:, -1]
        owner = torch.arange(len(encoded), device=device).repeat_interleave(n_candidates)
        cache.reorder_cache(owner)
        answers = [prompts.answer_ids(i) for i in candidates.reshape(-1)]
        width = max(len(a) for a in answers)
        ids = torch.as_tensor(np.stack([np.pad(a, (0, width - len(a))) for a in answers]), device=device)
        mask = torch.as_tensor(np.stack([np.arange(width) < len(a) for a in answers]), device=device).long()
        prefix_mask = prefix.attention_mask[owner]
        hidden = decoder(
            inputs_embeds=model.llm.get_input_embeddings()(ids),
            attention_mask=torch.cat([prefix_mask, mask], dim=-1),
            position_ids=prefix_mask.sum(-1, keepdim=True) + torch.arange(width, device=device),
            **with_cache,
        ).last_hidden_state
        first = model.token_log_probs(last[owner], ids[:, 0])
        rest = (model.token_log_probs(hidden[:, :-1], ids[:, 1:]) * mask[:, 1:]).sum(-1)
        scores.append(((first + rest) / mask.sum(-1)).view(len(encoded), n_candidates).cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def naive_candidate_scores(model: ALLMRec, prompts: NextItemPrompts, split: NextItemSplit) -> np.ndarray:
    """The same scores the slow way, each (prompt, candidate) run whole: the oracle of the tests."""
    rows = []
    for row in range(len(split)):
        history = np.repeat(split.history[row : row + 1], split.candidates.shape[1], axis=0)
        candidates = np.repeat(split.candidates[row : row + 1], split.candidates.shape[1], axis=0)
        batch, lengths = answered(prompts, history, candidates, split.candidates[row])
        embeddings = model.input_embeddings(batch, torch.as_tensor(history))
        hidden = run_decoder(model.decoder(), embeddings, batch.attention_mask)
        width = batch.input_ids.shape[1]
        rows.append(
            [
                model.token_log_probs(hidden[k, width - n - 1 : width - 1], batch.input_ids[k, width - n :])
                .mean()
                .item()
                for k, n in enumerate(lengths)
            ]
        )
    return np.array(rows)
