"""A-LLMRec (Kim et al., KDD 2024), stage 1: aligning a frozen CF model's item embeddings with text.

E_i is the item's embedding in a SASRec trained for the next item (cf/next_item.py), Q_i the sentence
embedding of its title (text_encoder.py; fine-tuned here unless frozen). Two encoders map them into one
latent space, two decoders map back:

  L_match = MSE(f_I^enc(E_i), f_T^enc(Q_i))                                   (matching)
  L_item  = MSE(f_I^dec(f_I^enc(E_i)), E_i),  L_text = MSE(f_T^dec(f_T^enc(Q_i)), Q_i)   (reconstruction)
  L_rec   = BCE(x_u . f_I^dec(f_I^enc(E_pos)), 1) + BCE(x_u . f_I^dec(f_I^enc(E_neg)), 0)   (recommendation)
  L       = L_match + alpha * L_item + beta * L_text + L_rec

x_u is SASRec's representation of the user's history, E_pos the next item, E_neg an item the user never
liked. The reconstructions keep the encoders from collapsing onto each other; the recommendation loss
keeps f_I^enc(E_i) useful for ranking. The joint collaborative-text embedding of an item is
e_i = f_I^enc(E_i); A-LLMRec(SBERT) uses f_T^enc(Q_i) instead, for items with no CF embedding.

Two departures were tried and are kept as switches, off by default: E_i and Q_i in units of their
spread over the catalogue (`scale_inputs`; all-MiniLM's unit vectors vary by about 0.05 per
dimension, so a raw reconstruction error hardly counts beside L_match) and encoders ending in a
LayerNorm without scale (`latent_norm`; free-scale latents can meet L_match by shrinking). On ML-1M
(cpu preset) neither helped (benchmarks/joint_space.py): in every form the text latents sit close
together, and an item's own title is among the 10 text latents nearest its CF latent for about 1% of
the items (chance 0.3%). `alignment_diagnostics` measures this on every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cf.sasrec import SASRec
from ..data.dataset import PAD
from ..data.next_item import NextItemSplit, NextItemTask, sample_candidates, training_positions
from ..device import seed_everything
from ..engine import cache_argument
from ..llm import float32_output_weight
from ..partial import load_progress, loop_state, restore_loop_state, save_progress
from ..prompt import ITEM_SLOT, USER, EncodedPrompt, PromptBatch, PromptBuilder, collate, user_piece
from ..text_encoder import SentenceEncoder
from .ccf_llm import positions_from_mask, run_decoder


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def _encoder(d_in: int, hidden: int, latent_dim: int, latent_norm: bool) -> nn.Sequential:
    norm = [nn.LayerNorm(latent_dim, elementwise_affine=False)] if latent_norm else []
    return nn.Sequential(*_mlp(d_in, hidden, latent_dim), *norm)


@dataclass
class AlignmentLosses:
    matching: torch.Tensor
    item_reconstruction: torch.Tensor
    text_reconstruction: torch.Tensor
    recommendation: torch.Tensor

    def total(self, alpha: float, beta: float, matching: float = 1.0) -> torch.Tensor:
        """L; `matching=0` is MLP-LLM, A-LLMRec without the matching loss."""
        reconstruction = alpha * self.item_reconstruction + beta * self.text_reconstruction
        return matching * self.matching + reconstruction + self.recommendation


class CollaborativeTextAlignment(nn.Module):
    """f_I^enc, f_I^dec, f_T^enc, f_T^dec; on E_i and Q_i in units of each dimension's spread over the
    catalogue once `set_scales` has run (identity before, and by default)."""

    def __init__(
        self, cf_dim: int, text_dim: int, latent_dim: int = 128, hidden: int = 256, latent_norm: bool = False
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.item_encoder, self.item_decoder = (
            _encoder(cf_dim, hidden, latent_dim, latent_norm),
            _mlp(latent_dim, hidden, cf_dim),
        )
        self.text_encoder, self.text_decoder = (
            _encoder(text_dim, hidden, latent_dim, latent_norm),
            _mlp(latent_dim, hidden, text_dim),
        )
        for name, dim in (("item", cf_dim), ("text", text_dim)):
            self.register_buffer(f"{name}_center", torch.zeros(dim))
            self.register_buffer(f"{name}_spread", torch.ones(dim))

    @torch.no_grad()
    def set_scales(self, item_cf: torch.Tensor, text: torch.Tensor) -> None:
        """Per-dimension mean and standard deviation of the catalogue's E_i (N, l) and Q_i (N, t)."""
        for name, table in (("item", item_cf), ("text", text)):
            getattr(self, f"{name}_center").copy_(table.float().mean(0))
            getattr(self, f"{name}_spread").copy_(table.float().std(0).clamp_min(1e-6))

    def _scaled(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        return (raw - getattr(self, f"{name}_center")) / getattr(self, f"{name}_spread")

    def joint(self, item_cf: torch.Tensor) -> torch.Tensor:
        """e_i = f_I^enc(E_i): the joint collaborative-text embedding. (N, l) -> (N, latent)"""
        return self.item_encoder(self._scaled("item", item_cf))

    def joint_from_text(self, text: torch.Tensor) -> torch.Tensor:
        """f_T^enc(Q_i): A-LLMRec(SBERT)'s stand-in for items without a CF embedding."""
        return self.text_encoder(self._scaled("text", text))

    def decoded_item(self, item_cf: torch.Tensor) -> torch.Tensor:
        """f_I^dec(f_I^enc(E_i)), back in E_i's units (what L_rec scores against x_u)."""
        return self.item_decoder(self.joint(item_cf)) * self.item_spread + self.item_center

    def losses(
        self,
        item_cf: torch.Tensor,
        text: torch.Tensor,
        user: torch.Tensor,
        positive_cf: torch.Tensor,
        negative_cf: torch.Tensor,
    ) -> AlignmentLosses:
        """item_cf (N, l) and text (N, t) of the same N items; user (B, l) with the CF embeddings of each
        user's next item and of a sampled negative, (B, l) each."""
        item_latent, text_latent = self.joint(item_cf), self.joint_from_text(text)
        positive, negative = self.decoded_item(positive_cf), self.decoded_item(negative_cf)
        positive_logit, negative_logit = (user * positive).sum(-1), (user * negative).sum(-1)
        return AlignmentLosses(
            matching=F.mse_loss(item_latent, text_latent),
            item_reconstruction=F.mse_loss(self.item_decoder(item_latent), self._scaled("item", item_cf)),
            text_reconstruction=F.mse_loss(self.text_decoder(text_latent), self._scaled("text", text)),
            recommendation=F.binary_cross_entropy_with_logits(positive_logit, torch.ones_like(positive_logit))
            + F.binary_cross_entropy_with_logits(negative_logit, torch.zeros_like(negative_logit)),
        )


@torch.no_grad()
def alignment_diagnostics(alignment: CollaborativeTextAlignment, item_cf, text, k: int = 10) -> dict:
    """What the joint space holds, for N items' E_i (N, l) and Q_i (N, t): each latent's spread across
    items (per-dimension standard deviation over root-mean-square value: 0 when every item maps to the
    same point) and how often an item's own text latent is among the k nearest its CF latent (chance k/N)."""
    item_latent, text_latent = alignment.joint(item_cf), alignment.joint_from_text(text)

    def spread(latent: torch.Tensor) -> float:
        return float(latent.std(0).mean() / latent.pow(2).mean().sqrt().clamp_min(1e-12))

    nearest = torch.cdist(item_latent, text_latent).topk(min(k, len(text)), largest=False).indices
    own = (nearest == torch.arange(len(item_cf), device=nearest.device)[:, None]).any(-1)
    return {
        "item_latent_spread": spread(item_latent),
        "text_latent_spread": spread(text_latent),
        f"own_text_top{k}": float(own.float().mean()),
        f"own_text_top{k}_chance": min(k, len(text)) / len(text),
    }


def joint_space_check(
    alignment: CollaborativeTextAlignment, sasrec: SASRec, text_items: torch.Tensor
) -> dict:
    """alignment_diagnostics over every item with a title, from Q_i of every item (item_text_embeddings)."""
    titled = _titled(text_items)
    return alignment_diagnostics(alignment, sasrec.item_embedding(titled), text_items[titled])


def _titled(text_items: torch.Tensor) -> torch.Tensor:
    """Ids of the items with a title: item_text_embeddings leaves the others at zero."""
    return text_items.abs().sum(-1).nonzero()[:, 0]


@torch.no_grad()
def item_text_embeddings(encoder: SentenceEncoder, task: NextItemTask, batch_size: int = 256) -> torch.Tensor:
    """Q_i of every item (zeros for the padding id and untitled items). -> (n_items, text dim)"""
    titles = [t if isinstance(t, str) else "" for t in task.item_titles]
    vectors = [encoder(titles[start : start + batch_size]) for start in range(0, len(titles), batch_size)]
    table = torch.cat(vectors)
    table[[i for i, t in enumerate(titles) if not t.strip()]] = 0.0
    return table


@dataclass
class AlignmentResult:
    alignment: CollaborativeTextAlignment
    losses: list[dict]  # per epoch: the mean of each loss


def train_alignment(
    task: NextItemTask,
    sasrec: SASRec,
    encoder: SentenceEncoder,
    *,
    latent_dim: int = 128,
    hidden: int = 256,
    latent_norm: bool = False,
    scale_inputs: bool = False,
    alpha: float = 0.5,
    beta: float = 0.5,
    lr: float = 1e-4,
    batch_size: int = 32,
    epochs: int = 1,
    freeze_text: bool = False,
    matching: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> AlignmentResult:
    """Stage 1 over the task's training rows (a user's history and next item, and a sampled item the user
    never liked). SASRec stays frozen; SBERT is fine-tuned with the alignment unless `freeze_text`.
    `scale_inputs`: E_i and Q_i in units of their spread over the catalogue (set_scales)."""
    generator = seed_everything(seed)
    sasrec.eval().requires_grad_(False)
    encoder.requires_grad_(not freeze_text)
    device = next(sasrec.parameters()).device
    alignment = CollaborativeTextAlignment(sasrec.config.dim, encoder.dim, latent_dim, hidden, latent_norm)
    alignment = alignment.to(device)
    if scale_inputs:
        encoder.eval()
        texts = item_text_embeddings(encoder, task)
        titled = _titled(texts)
        alignment.set_scales(sasrec.item_embedding(titled), texts[titled])
    parameters = list(alignment.parameters()) + ([] if freeze_text else list(encoder.parameters()))
    optimiser = torch.optim.Adam(parameters, lr=lr)
    train = task.splits["train"]
    liked = {uid: set(sequence.tolist()) for uid, sequence in task.sequences.items()}
    sampler = np.random.default_rng(seed)
    titles = task.item_titles
    history_width = sasrec.config.max_history
    epochs_log = []
    for _ in tqdm(range(epochs), desc="A-LLMRec stage 1", unit="epoch", disable=not progress):
        encoder.train(not freeze_text)
        totals: dict[str, list[float]] = {}
        for batch in torch.randperm(len(train), generator=generator).split(batch_size):
            rows = batch.numpy()
            positive = torch.as_tensor(train.target[rows], device=device)
            negative = torch.as_tensor(
                [_unliked(liked[int(u)], task.n_items, sampler) for u in train.uid[rows]], device=device
            )
            history = torch.as_tensor(train.history[rows][:, -history_width:], device=device)
            with torch.no_grad():
                user = sasrec.user_embedding(torch.zeros_like(positive), history)
                positive_cf, negative_cf = sasrec.item_embedding(positive), sasrec.item_embedding(negative)
            items = torch.cat([positive, negative])
            text = encoder([titles[int(i)] for i in items])
            losses = alignment.losses(
                torch.cat([positive_cf, negative_cf]), text, user, positive_cf, negative_cf
            )
            loss = losses.total(alpha, beta, matching)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for name, value in vars(losses).items():
                totals.setdefault(name, []).append(value.item())
        epochs_log.append({name: float(np.mean(values)) for name, values in totals.items()})
    alignment.eval()
    encoder.eval()
    return AlignmentResult(alignment, epochs_log)


def _unliked(liked: set[int], n_items: int, rng: np.random.Generator) -> int:
    item = int(rng.integers(1, n_items))
    while item in liked:
        item = int(rng.integers(1, n_items))
    return item


# -- stage 2: soft prompts into a frozen LLM -------------------------------------------------------------

# A-LLMRec's prompt: the user's representation, the history and the candidates as titles each followed
# by its joint embedding, and the answer: the next item's title, in quotes.
STAGE2_TEMPLATE = (
    "[UserRep] is a user representation. This user has watched {history} in the past. Recommend a {item} "
    "for this user to watch next from the following set of {item} titles, {candidates}. The recommendation is"
)


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


class ALLMRec(nn.Module):
    """Stage 2's model: a frozen LLM reading A-LLMRec's prompt, whose [UserRep] position is
    F_U(x_u) and whose item slots are F_I(e_i); only F_U and F_I train (the language-model loss on the
    next item's title). With `text_items`, e_i comes from f_T^enc(Q_i) (A-LLMRec(SBERT))."""

    def __init__(
        self, llm: nn.Module, sasrec: SASRec, alignment: CollaborativeTextAlignment, hidden: int = 256
    ):
        super().__init__()
        self.llm, self.sasrec, self.alignment = llm, sasrec, alignment
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.user_projection = _mlp(sasrec.config.dim, hidden, llm_dim)  # F_U
        self.item_projection = _mlp(alignment.latent_dim, hidden, llm_dim)  # F_I
        self.text_items: torch.Tensor | None = None  # (n_items, text dim): Q_i, for A-LLMRec(SBERT)
        for frozen in (llm, sasrec, alignment):
            frozen.requires_grad_(False)

    def joint(self, iid: torch.Tensor) -> torch.Tensor:
        """e_i for item ids (any shape): f_I^enc(E_i), or f_T^enc(Q_i) where text_items is set."""
        if self.text_items is not None:
            return self.alignment.joint_from_text(self.text_items[iid])
        return self.alignment.joint(self.sasrec.item_embedding(iid))

    def input_embeddings(self, batch: PromptBatch, history: torch.Tensor) -> torch.Tensor:
        """(B, T, d): text tokens as the LLM embeds them; [UserRep] = F_U(x_u); slots = F_I(e_i)."""
        embeddings = self.llm.get_input_embeddings()(batch.input_ids)
        dtype = embeddings.dtype
        embeddings = embeddings.clone()
        is_user, is_slot = batch.kind == USER, batch.kind == ITEM_SLOT
        with torch.no_grad():
            user = self.sasrec.user_embedding(
                torch.zeros_like(batch.uid), history[:, -self.sasrec.config.max_history :]
            )
            items = self.joint(batch.item[is_slot])
        embeddings[is_user] = self.user_projection(user)[is_user.nonzero()[:, 0]].to(dtype)
        embeddings[is_slot] = self.item_projection(items).to(dtype)
        return embeddings

    def token_log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(token) from final hidden states, in float32. (..., d), (...) -> (...)"""
        head = self.llm.get_output_embeddings()
        logits = F.linear(hidden.float(), float32_output_weight(head))
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def train(self, mode: bool = True) -> ALLMRec:
        super().train(mode)
        for frozen in (self.llm, self.sasrec, self.alignment):
            frozen.eval()  # frozen parts keep eval mode: no dropout on the user representation
        return self

    def decoder(self) -> nn.Module:
        """The decoder stack under the LM head (under peft's wrapper, where LoRA was added)."""
        causal_lm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return getattr(causal_lm, causal_lm.base_model_prefix)


def _answered(prompts: NextItemPrompts, history: np.ndarray, candidates: np.ndarray, target: np.ndarray):
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


def next_title_loss(
    model: ALLMRec,
    prompts: NextItemPrompts,
    history: np.ndarray,
    candidates: np.ndarray,
    target: np.ndarray,
    compile: bool = False,
) -> torch.Tensor:
    """The language-model loss on the next item's title: mean -log p over its tokens, given the prompt;
    with `compile`, through the LLM's layers compiled (run_decoder)."""
    device = next(model.user_projection.parameters()).device
    batch, lengths = _answered(prompts, history, candidates, target)
    batch = batch.to(device)
    embeddings = model.input_embeddings(batch, torch.as_tensor(history, device=device))
    hidden = run_decoder(model.decoder(), embeddings, batch.attention_mask, compile)
    width = batch.input_ids.shape[1]
    rows = torch.as_tensor(np.repeat(np.arange(len(lengths)), lengths), device=device)
    at = torch.as_tensor(np.concatenate([np.arange(width - n, width) for n in lengths]), device=device)
    # the answer's tokens sit at the end of each (left-padded) row; each is predicted one position earlier
    return -model.token_log_probs(hidden[rows, at - 1], batch.input_ids[rows, at]).mean()


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
        batch, lengths = _answered(prompts, history, candidates, split.candidates[row])
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


def train_stage2(
    model: ALLMRec,
    prompts: NextItemPrompts,
    task: NextItemTask,
    *,
    lr: float = 1e-4,
    batch_size: int = 4,
    epochs: int = 1,
    n_candidates: int = 20,
    seed: int = 0,
    rows: int = 0,
    positions: int = 1,
    parameters: list[nn.Parameter] | None = None,
    compile: bool = False,
    progress: bool = True,
    progress_file: Path | None = None,
    checkpoint_seconds: float = 300.0,
    label: str = "A-LLMRec stage 2",
) -> Stage2Result:
    """Train F_U and F_I (or the given `parameters`: the LoRA weights of the TALLRec baseline) on the
    task's training rows at the last `positions` of each user's sequence (training_positions), each with
    candidates drawn afresh (its next item and items its user never liked); -> every step's loss and
    the seconds it took.
    `compile`: the LLM's layers run compiled (about 15-40 s once per process). With `progress_file`,
    the loop's state is saved there every `checkpoint_seconds` and after the last step, and a call that
    finds one there goes on from it, ending as it would have unbroken. `label` names the loop on
    its progress bar."""
    started = time.perf_counter()
    generator = seed_everything(seed)
    rng = np.random.default_rng(seed)
    if parameters is None:
        parameters = [*model.user_projection.parameters(), *model.item_projection.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=lr)
    train = training_positions(task, positions)
    chosen = np.arange(len(train))  # `rows` > 0: a seeded sample of the training rows
    if 0 < rows < len(train):
        chosen = np.sort(rng.choice(len(train), rows, replace=False))
    titled = titled_items(prompts, task.n_items)
    steps_per_epoch = -(-len(chosen) // batch_size)
    losses, order, seconds_before = [], None, 0.0
    saved = load_progress(progress_file)
    if saved is not None:
        losses, order, seconds_before = _resume_stage2(saved, parameters, optimiser, generator, rng)
    bar = tqdm(
        total=steps_per_epoch * epochs, initial=len(losses), desc=label, unit="step",
        disable=not progress,
    )  # fmt: skip
    saved_at = time.perf_counter()
    for epoch in range(len(losses) // steps_per_epoch, epochs):
        if order is None or epoch * steps_per_epoch == len(losses):
            order = torch.as_tensor(chosen)[torch.randperm(len(chosen), generator=generator)]
        for batch in order.split(batch_size)[len(losses) - epoch * steps_per_epoch :]:
            rows = batch.numpy()
            candidates = draw_candidates(task, titled, train.uid[rows], train.target[rows], n_candidates, rng)
            model.train()
            history, target = train.history[rows], train.target[rows]
            loss = next_title_loss(model, prompts, history, candidates, target, compile)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.update()
            last = len(losses) == steps_per_epoch * epochs
            if progress_file is not None and (last or time.perf_counter() - saved_at >= checkpoint_seconds):
                seconds = seconds_before + time.perf_counter() - started
                _save_stage2(progress_file, parameters, optimiser, losses, seconds, order, generator, rng)
                saved_at = time.perf_counter()
    bar.close()
    model.eval()
    return Stage2Result(losses, seconds_before + time.perf_counter() - started)


@dataclass
class Stage2Result:
    losses: list[float]  # every step's, across the processes an interrupted stage ran in
    seconds: float  # the stage's time, over those processes (to their last saved step)


def _save_stage2(path, parameters, optimiser, losses, seconds, order, generator, rng) -> None:
    """Stage 2's state after a step: weights, optimiser, losses, this epoch's order, random numbers."""
    tensors, groups = loop_state(parameters, optimiser)
    tensors = {**tensors, "order": order, "generator": generator.get_state()}
    record = {"losses": losses, "seconds": seconds, "optimiser": groups, "numpy_rng": rng.bit_generator.state}
    save_progress(path, tensors, record)


def _resume_stage2(saved, parameters, optimiser, generator, rng) -> tuple[list[float], torch.Tensor, float]:
    """Load what `_save_stage2` kept into the loop's objects; -> (losses so far, this epoch's order,
    seconds so far)."""
    tensors, record = saved
    restore_loop_state(tensors, record["optimiser"], parameters, optimiser)
    generator.set_state(tensors["generator"])
    rng.bit_generator.state = record["numpy_rng"]
    return record["losses"], tensors["order"], record["seconds"]


def titled_items(prompts: NextItemPrompts, n_items: int) -> np.ndarray:
    """(n_items,) bool: which item ids have a title (only those can be candidates)."""
    return np.array([bool(prompts.pieces.title(i)) if i else False for i in range(n_items)])


def draw_candidates(
    task: NextItemTask,
    titled: np.ndarray,
    uids: np.ndarray,
    targets: np.ndarray,
    n_candidates: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A candidate set per training row: its target and titled items its user never liked. -> (B, C)"""
    seen = [set(task.sequences[int(u)].tolist()) for u in uids]
    return np.stack(
        [sample_candidates(int(t), s, titled, n_candidates, rng) for t, s in zip(targets, seen, strict=True)]
    )


GENRE_QUESTION = "Specify the genres this user would enjoy."


@torch.no_grad()
def ask(
    model: ALLMRec,
    prompts: NextItemPrompts,
    history: np.ndarray,
    question: str = GENRE_QUESTION,
    max_tokens: int = 24,
) -> str:
    """The frozen LLM's greedy answer to `question` about the user whose history the soft prompt carries."""
    model.eval()
    device = next(model.user_projection.parameters()).device
    prompt = prompts.encode_question(history, question)
    batch = collate([prompt], [0], [0], prompts.pieces.pad_id, 0).to(device)
    embeddings = model.input_embeddings(batch, torch.as_tensor(history[None], device=device))
    output = model.llm.generate(
        inputs_embeds=embeddings,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=prompts.pieces.pad_id,
    )
    return prompts.pieces.tokenizer.decode(output[0], skip_special_tokens=True).strip()
