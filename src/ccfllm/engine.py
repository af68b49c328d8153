"""How prompts are scored: the engine, and the naive path kept beside it as its correctness oracle.

Both compute CCFLLM's click score p_yes / (p_yes + p_no) for the same prompts; they differ only in how
much work they do for it.

The engine (`score_rows`) shares work between rows. A prompt is a prefix (the question, the user's
shown history, the [User] token and the words up to "the movie") and a suffix (the target's quoted title
and "Answer with ... #Answer:", about 20 tokens). The prefix depends only on the user and the history it
shows, so rows that share it (on the ML-1M test split, 7,331 rows have about 4,100 prefixes) run it
once: its key/value cache is copied to each of its rows, and only the suffixes run per row. Prefixes are
batched in order of length (little padding), the output layer runs at the answer position only
(`CCFLLM.answer_log_probs`), and the model computes in its own dtype (bf16 where the hardware has it).

The naive path (`naive_score_rows`) does what a first implementation would: rows in input order, each
batch padded to its longest prompt, the LM's full-vocabulary logits at every position, no cache. Run
it on a float32 model; `benchmarks/speed.py` and the tests compare the two row by row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import scoring_layers
from .data.dataset import Split
from .distributed import SINGLE, World
from .errors import CCFLLMError
from .llm_speed import GapDropout, lora_dropouts, merged_lora
from .methods.ccf_llm import CCFLLM, Answer, answer_from_logits, positions_from_mask
from .prompt import EncodedPrompt, PromptBatch, PromptBuilder, collate


@torch.no_grad()
def score_rows(
    model: CCFLLM,
    builder: PromptBuilder,
    split: Split,
    rows: np.ndarray | None = None,
    batch_size: int = 32,
    progress: bool = False,
    world: World = SINGLE,
) -> np.ndarray:
    """Click scores for `rows` of `split` (all rows if None), in input order. -> (len(rows),)

    `batch_size` counts prefixes; each prefix brings its rows' suffixes along. Where the model's
    `compile_scoring` is set, a Llama or Qwen2 decoder's layers run compiled (`scoring_layers`).
    In a data-parallel `world`, rank r scores every size-th batch from the r-th (batches grow
    longer along the list, so each rank gets its share of long ones) and every rank gets all the
    scores: each batch is the one a single process would run, so the scores are its, to the bit.
    """
    model.eval()
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    prompts = [builder.encode(int(split.iid[r]), split.history[r], int(split.uid[r])) for r in rows]
    groups = _rows_by_prefix(prompts, split.uid[rows])
    groups.sort(key=lambda members: prompts[members[0]].prefix_length)
    scores = np.zeros(len(rows), dtype=np.float64)  # rows another rank scores: zero in the sum
    device = next(model.parameters()).device
    chunks = [groups[start : start + batch_size] for start in range(0, len(groups), batch_size)]
    chunks = chunks[world.rank :: world.size]
    progress = progress and world.is_main
    with merged_lora(model):
        weights = _layer_weights(model)
        for chunk in tqdm(chunks, desc=f"score {split.name}", unit="batch", disable=not progress):
            leaders = [members[0] for members in chunk]
            members = [p for group in chunk for p in group]
            owner = torch.tensor([k for k, group in enumerate(chunk) for _ in group], device=device)
            prefix = _collated([prompts[p].prefix() for p in leaders], split, rows[leaders], builder.pad_id)
            suffix = _collated([prompts[p].suffix() for p in members], split, rows[members], builder.pad_id)
            if weights is not None:
                answer = _through_layer_functions(model, weights, prefix.to(device), suffix.to(device), owner)
            else:
                answer = _prefix_then_suffix(model, prefix.to(device), suffix.to(device), owner)
            scores[members] = model.click_score(answer).double().cpu().numpy()
    return world.sum_over_ranks(scores)


def _layer_weights(model: CCFLLM) -> list | None:
    """The decoder's layer weights for `scoring_layers` where the model scores through its layer
    functions (compiled, or with int8 weights), in int8 where `scoring_int8` says so; None where it
    scores through the decoder's own forward."""
    int8 = getattr(model, "scoring_int8", False)
    if not (model.compile_scoring or int8):
        return None
    device = next(model.parameters()).device
    if int8 and device.type != "cpu":
        raise CCFLLMError(
            f"scoring_int8 runs on a CPU only (PyTorch's fbgemm kernel); the model is on {device}: "
            "set scoring_int8=false."
        )
    weights = scoring_layers.layer_weights(model.decoder_parts()[1])
    return scoring_layers.int8_weights(weights) if int8 and weights is not None else weights


def _collated(parts: list[EncodedPrompt], split: Split, rows: np.ndarray, pad_id: int) -> PromptBatch:
    """One padded batch of prompt parts (prefixes or suffixes) of `rows` of `split`."""
    return collate(parts, split.uid[rows], split.iid[rows], pad_id, split.history.shape[1])


def _rows_by_prefix(prompts: Sequence[EncodedPrompt], uids: np.ndarray) -> list[list[int]]:
    """Positions of the rows that share a prefix, one list per distinct (user, prefix tokens)."""
    groups: dict[tuple, list[int]] = {}
    for position, (prompt, uid) in enumerate(zip(prompts, uids, strict=True)):
        head = prompt.prefix()
        key = (int(uid), head.input_ids.tobytes(), head.item.tobytes(), head.history.tobytes())
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def _prefix_then_suffix(
    model: CCFLLM, prefix: PromptBatch, suffix: PromptBatch, owner: torch.Tensor
) -> Answer:
    """Run the prefixes once, copy each one's cache to its rows (`owner`), run the suffixes on top."""
    _, decoder = model.decoder_parts()
    cache = DynamicCache()
    with_cache = {cache_argument(decoder): cache, "use_cache": True}
    decoder(
        inputs_embeds=model.input_embeddings(prefix),
        attention_mask=prefix.attention_mask,
        position_ids=positions_from_mask(prefix.attention_mask),
        **with_cache,
    )
    cache.reorder_cache(owner)
    prefix_mask = prefix.attention_mask[owner]
    # [pad][prefix][pad][suffix]: padding inside the row is masked, and the suffix's positions carry on
    # from its prefix's last real token, so each row sees exactly its own prompt.
    positions = prefix_mask.sum(-1, keepdim=True) + positions_from_mask(suffix.attention_mask)
    hidden = decoder(
        inputs_embeds=model.input_embeddings(suffix),
        attention_mask=torch.cat([prefix_mask, suffix.attention_mask], dim=-1),
        position_ids=positions,
        **with_cache,
    ).last_hidden_state
    return model.answer_log_probs(hidden[:, -1])


def _through_layer_functions(
    model: CCFLLM, weights: list, prefix: PromptBatch, suffix: PromptBatch, owner: torch.Tensor
) -> Answer:
    """The same, with a Llama or Qwen2 decoder's layers as compiled functions of their `weights`
    (`scoring_layers`)."""
    _, decoder = model.decoder_parts()
    hidden = scoring_layers.answer_hidden(
        decoder,
        weights,
        (model.input_embeddings(prefix), prefix.attention_mask),
        (model.input_embeddings(suffix), suffix.attention_mask),
        owner,
        compiled=model.compile_scoring and not getattr(model, "scoring_int8", False),
    )
    return model.answer_log_probs(hidden)


def cache_argument(decoder: torch.nn.Module) -> str:
    """transformers 5.23 renamed the decoders' `past_key_values` argument to `cache`; take either."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# -- the naive path: the oracle -------------------------------------------------------------------


def naive_log_probs(model: CCFLLM, batch: PromptBatch) -> Answer:
    """log p_yes, log p_no from the LM's own forward: full-vocabulary logits at every position."""
    causal_lm, _ = model.decoder_parts()
    logits = causal_lm(
        inputs_embeds=model.input_embeddings(batch),
        attention_mask=batch.attention_mask,
        position_ids=positions_from_mask(batch.attention_mask),
        use_cache=False,
    ).logits  # (B, T, V)
    return answer_from_logits(logits[:, -1].float(), model.yes_id, model.no_id)


def use_plain_lora_dropout(model: CCFLLM) -> None:
    """The naive path's LoRA dropout: peft's own `nn.Dropout`, one uniform draw per position, in place
    of `GapDropout` (the same distribution, drawn faster)."""
    for _, dropouts in lora_dropouts(model):
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, GapDropout):
                dropouts[adapter] = torch.nn.Dropout(dropout.p)


@torch.no_grad()
def naive_score_rows(
    model: CCFLLM,
    builder: PromptBuilder,
    split: Split,
    rows: np.ndarray | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """Click scores the simple way: batches in input order, padded to their longest prompt, no cache."""
    model.eval()
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    device = next(model.parameters()).device
    scores = np.empty(len(rows), dtype=np.float64)
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=f"naive {split.name}", unit="batch", disable=not progress):
        chosen = rows[start : start + batch_size]
        batch = builder.batch(split.uid[chosen], split.iid[chosen], split.history[chosen]).to(device)
        scores[start : start + len(chosen)] = (
            model.click_score(naive_log_probs(model, batch)).double().cpu().numpy()
        )
    return scores
