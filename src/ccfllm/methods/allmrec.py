"""A-LLMRec (Kim et al., KDD 2024): its modules. Stage 1 aligns a frozen CF model's item embeddings with text.

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

Stage 2's model is ALLMRec below: the frozen LLM reads A-LLMRec's prompt (next_item_prompt.py) with F_U(x_u)
at the user position and F_I(e_i) in each item's slot, trained on the next item's title
(next_title_loss). The two training loops: next_item_train.py; ranking candidates: next_item_scoring.py;
candidate sampling: data/next_item.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cf.sasrec import SASRec
from ..data.next_item import NextItemTask
from ..llm_speed import float32_output_weight
from ..next_item_prompt import GENRE_QUESTION, NextItemPrompts, answered
from ..prompt import ITEM_SLOT, USER, PromptBatch, collate
from ..text_encoder import SentenceEncoder
from .ccf_llm import run_decoder


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
    titled = titled_ids(text_items)
    return alignment_diagnostics(alignment, sasrec.item_embedding(titled), text_items[titled])


def titled_ids(text_items: torch.Tensor) -> torch.Tensor:
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
    batch, lengths = answered(prompts, history, candidates, target)
    batch = batch.to(device)
    embeddings = model.input_embeddings(batch, torch.as_tensor(history, device=device))
    hidden = run_decoder(model.decoder(), embeddings, batch.attention_mask, compile)
    width = batch.input_ids.shape[1]
    rows = torch.as_tensor(np.repeat(np.arange(len(lengths)), lengths), device=device)
    at = torch.as_tensor(np.concatenate([np.arange(width - n, width) for n in lengths]), device=device)
    # the answer's tokens sit at the end of each (left-padded) row; each is predicted one position earlier
    return -model.token_log_probs(hidden[rows, at - 1], batch.input_ids[rows, at]).mean()


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
