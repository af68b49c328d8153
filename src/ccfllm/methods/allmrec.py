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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..cf.sasrec import SASRec
from ..data.next_item import NextItemTask
from ..device import seed_everything
from ..text_encoder import SentenceEncoder


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


@dataclass
class AlignmentLosses:
    matching: torch.Tensor
    item_reconstruction: torch.Tensor
    text_reconstruction: torch.Tensor
    recommendation: torch.Tensor

    def total(self, alpha: float, beta: float) -> torch.Tensor:
        return (
            self.matching
            + alpha * self.item_reconstruction
            + beta * self.text_reconstruction
            + self.recommendation
        )


class CollaborativeTextAlignment(nn.Module):
    """f_I^enc, f_I^dec, f_T^enc, f_T^dec."""

    def __init__(self, cf_dim: int, text_dim: int, latent_dim: int = 128, hidden: int = 256):
        super().__init__()
        self.item_encoder, self.item_decoder = (
            _mlp(cf_dim, hidden, latent_dim),
            _mlp(latent_dim, hidden, cf_dim),
        )
        self.text_encoder, self.text_decoder = (
            _mlp(text_dim, hidden, latent_dim),
            _mlp(latent_dim, hidden, text_dim),
        )

    def joint(self, item_cf: torch.Tensor) -> torch.Tensor:
        """e_i = f_I^enc(E_i): the joint collaborative-text embedding. (N, l) -> (N, latent)"""
        return self.item_encoder(item_cf)

    def joint_from_text(self, text: torch.Tensor) -> torch.Tensor:
        """f_T^enc(Q_i): A-LLMRec(SBERT)'s stand-in for items without a CF embedding."""
        return self.text_encoder(text)

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
        item_latent, text_latent = self.item_encoder(item_cf), self.text_encoder(text)
        positive = self.item_decoder(self.item_encoder(positive_cf))
        negative = self.item_decoder(self.item_encoder(negative_cf))
        positive_logit, negative_logit = (user * positive).sum(-1), (user * negative).sum(-1)
        return AlignmentLosses(
            matching=F.mse_loss(item_latent, text_latent),
            item_reconstruction=F.mse_loss(self.item_decoder(item_latent), item_cf),
            text_reconstruction=F.mse_loss(self.text_decoder(text_latent), text),
            recommendation=F.binary_cross_entropy_with_logits(positive_logit, torch.ones_like(positive_logit))
            + F.binary_cross_entropy_with_logits(negative_logit, torch.zeros_like(negative_logit)),
        )


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
    alpha: float = 0.5,
    beta: float = 0.5,
    lr: float = 1e-4,
    batch_size: int = 32,
    epochs: int = 1,
    freeze_text: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> AlignmentResult:
    """Stage 1 over the task's training rows (a user's history and next item, and a sampled item the user
    never liked). SASRec stays frozen; SBERT is fine-tuned with the alignment unless `freeze_text`."""
    generator = seed_everything(seed)
    sasrec.eval().requires_grad_(False)
    encoder.requires_grad_(not freeze_text)
    device = next(sasrec.parameters()).device
    alignment = CollaborativeTextAlignment(sasrec.config.dim, encoder.dim, latent_dim, hidden).to(device)
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
            loss = losses.total(alpha, beta)
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
