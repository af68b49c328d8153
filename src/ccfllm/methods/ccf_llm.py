"""CCF-LLM (Collaborative Cross-modal Fusion with LLMs, CIKM 2024), sections 3.2-3.4.

A hybrid prompt (prompt.py) marks where CF embeddings go. Text tokens keep the LLM's input embeddings;
the [User_u] position becomes ALG(x_u^CF) (Eq. 2); every title token t of an item i becomes
x_i^SM[t] + alpha ⊙ ALG(x_i^CF) with alpha = MLP(ALG(x_i^CF)) + MLP(x_i^SM[t]) (Eqs. 3-4). The LLM,
tuned with LoRA, answers "Yes" or "No"; p_yes / (p_yes + p_no) is the click score.

The method's record (CCF_LLM, at the end): the fused prompt, a trained backbone's x^CF, Eq. 5, every
strategy of Table 4, and a second backbone (Eq. 7). CoLLM reads the same backbone source (BACKBONE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cf.base import CFModel
from ..config import CCFConfig
from ..errors import CCFLLMError
from ..llm_speed import attention_for_training, float32_output_weight, run_compiled
from ..prompt import ITEM, ITEM_SLOT, USER, PromptBatch
from .method import CFSource, Loss, Method


class CFFeatures(nn.Module):
    """x^CF from a trained backbone (Eq. 1). With `with_bias`, the backbone's biases are appended so
    that x_u · x_i is the backbone's whole logit: x_u = [u, b_u, 1], x_i = [i, 1, b_i]. Users and items
    absent from the backbone's training rows get zero vectors: no collaborative signal, text only."""

    trainable = False  # a trained backbone stays frozen unless the user asks (`tune_cf`)

    def __init__(
        self, backbone: CFModel, known_users: torch.Tensor, known_items: torch.Tensor, with_bias: bool
    ):
        super().__init__()
        self.backbone = backbone
        self.with_bias = with_bias
        self.register_buffer("known_users", known_users.bool(), persistent=False)  # (n_users,)
        self.register_buffer("known_items", known_items.bool(), persistent=False)  # (n_items,)

    @property
    def dim(self) -> int:
        return self.backbone.config.dim + (2 if self.with_bias else 0)

    def users(self, uid: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(B,) ids, (B, H) histories -> (B, l)"""
        known = self._known(self.known_users, uid)
        safe_uid = torch.where(known, uid, torch.zeros_like(uid))
        vectors = self.backbone.user_embedding(safe_uid, history[:, -self.backbone.config.max_history :])
        if self.with_bias:
            bias = self.backbone.user_bias(safe_uid)  # (B, 1)
            vectors = torch.cat([vectors, bias, torch.ones_like(bias)], dim=-1)
        return vectors * known[:, None]

    def items(self, iid: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, l)"""
        known = self._known(self.known_items, iid)
        safe_iid = torch.where(known, iid, torch.zeros_like(iid))
        vectors = self.backbone.item_embedding(safe_iid)
        if self.with_bias:
            bias = self.backbone.item_bias(safe_iid)
            vectors = torch.cat([vectors, torch.ones_like(bias), bias], dim=-1)
        return vectors * known[:, None]

    @staticmethod
    def _known(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        in_range = (ids >= 0) & (ids < len(table))
        return in_range & table[ids.clamp(0, len(table) - 1)]


class Alignment(nn.Module):
    """ALG: R^l -> R^d, an MLP (Eq. 2)."""

    def __init__(self, cf_dim: int, hidden: int, llm_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cf_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))

    def forward(self, cf: torch.Tensor) -> torch.Tensor:
        return self.net(cf)


class Gate(nn.Module):
    """GATE (Eq. 3): alpha = MLP_G1(aligned CF) + MLP_G2(title token embedding), dimension-wise.

    `mode` gives the ablations of Figure 3a: 'alpha-one' fixes alpha = 1, 'alpha-scalar' makes it one
    number per token. The output layers start at zero, so at initialisation the fused token equals the
    title token (Eq. 4 with alpha = 0) and stage 2 starts from exactly the stage-1 model.
    """

    def __init__(self, llm_dim: int, hidden: int, mode: str = "gate"):
        super().__init__()
        self.mode = mode
        out_dim = 1 if mode == "alpha-scalar" else llm_dim
        self.from_cf = nn.Sequential(nn.Linear(llm_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.from_text = nn.Sequential(nn.Linear(llm_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        for mlp in (self.from_cf, self.from_text):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, aligned_cf: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(N, d), (N, d) -> alpha (N, d) or (N, 1)"""
        if self.mode == "alpha-one":
            return torch.ones_like(token[:, :1])
        return self.from_cf(aligned_cf) + self.from_text(token)


@contextlib.contextmanager
def recording_alpha(gate: Gate) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every alpha `gate` computes (Eq. 3), detached, one (N, d) or (N, 1) tensor per
    call in call order: N title tokens in the batch's row-major order of ITEM positions. A forward hook
    only reads the output, so the scores are exactly those computed without it."""
    recorded: list[torch.Tensor] = []
    handle = gate.register_forward_hook(lambda module, inputs, alpha: recorded.append(alpha.detach()))
    try:
        yield recorded
    finally:
        handle.remove()


def fuse(token: torch.Tensor, aligned_cf: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 4: x~_i[t] = x_i^SM[t] + alpha ⊙ ALG(x_i^CF)."""
    return token + alpha * aligned_cf


class Answer(NamedTuple):
    """What the LLM says at the answer position, in float32. (B,) each."""

    log_p_yes: torch.Tensor  # under the full-vocabulary softmax
    log_p_no: torch.Tensor
    yes_logit: torch.Tensor  # the raw logit of "Yes" (CoLLM scores and trains on it)


class CCFLLM(nn.Module):
    """The LLM (with LoRA), the CF features, ALG and GATE; answers p_yes / p_no for a prompt batch.

    The same module runs the baselines that share its parts (methods/__init__.py): the prompt decides
    which CF positions exist (none: TALLRec; fused title tokens: CCF-LLM; CoLLM's extra slots), and
    `cf` may be free tables instead of a trained backbone (Softprompt).
    """

    def __init__(
        self,
        llm: nn.Module,
        cf: nn.Module | None,
        config: CCFConfig,
        yes_id: int,
        no_id: int,
        score: Callable[[Answer], torch.Tensor] | None = None,
        second_cf: CFFeatures | None = None,
    ):
        super().__init__()
        self.click_score = score or normalised_p_yes  # what the engine ranks by
        self.llm = llm
        self.cf = cf  # None for a text-only method: then there is no ALG or GATE either
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.alignment = None if cf is None else Alignment(cf.dim, config.alg_hidden, llm_dim)
        self.gate = None if cf is None else Gate(llm_dim, config.gate_hidden, config.fusion)
        # Eq. 7: a second backbone fused at once, with its own ALG and a second GATE giving beta
        self.second_cf = second_cf
        self.alignment2 = None if second_cf is None else Alignment(second_cf.dim, config.alg_hidden, llm_dim)
        self.gate2 = None if second_cf is None else Gate(llm_dim, config.gate_hidden, config.fusion)
        self.yes_id, self.no_id = yes_id, no_id
        self.compile_training = config.compile_training
        self.compile_scoring = config.compile_scoring
        self.scoring_int8 = config.scoring_int8

    def fusion_modules(self) -> list[nn.Module]:
        """What stage 2 trains (Θ_A and Θ_G; and free user/item tables, where `cf` holds them)."""
        if self.cf is None:
            return []
        second = [self.alignment2, self.gate2] if self.second_cf is not None else []
        return [self.alignment, self.gate, *second] + ([self.cf] if self.cf.trainable else [])

    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """Section 3.3: the embedding sequence fed to the LLM. -> (B, T, d)"""
        embeddings = self.llm.get_input_embeddings()(batch.input_ids)  # text and title tokens: x^SM
        is_user, is_item, is_slot = batch.kind == USER, batch.kind == ITEM, batch.kind == ITEM_SLOT
        if not (is_user.any() or is_item.any() or is_slot.any()):
            return embeddings  # a text-only prompt
        # ALG and GATE compute in float32 (float32 weights update stably), the LLM in its own dtype.
        dtype = embeddings.dtype
        embeddings = embeddings.clone()
        if is_user.any():
            users = self.alignment(self.cf.users(batch.uid, batch.history).float())  # (B, d), Eq. 2
            if self.second_cf is not None:  # the paper fuses items only; the user token sums both
                users = users + self.alignment2(self.second_cf.users(batch.uid, batch.history).float())
            embeddings[is_user] = users[is_user.nonzero()[:, 0]].to(dtype)
        if is_item.any():
            titles = embeddings[is_item].float()  # (N, d): x_i^SM[t] of every title token in the batch
            aligned = self.alignment(self.cf.items(batch.item[is_item]).float())  # (N, d), Eq. 2
            alpha = self.gate(aligned, titles)  # Eq. 3
            fused = fuse(titles, aligned, alpha)  # Eq. 4
            if self.second_cf is not None:  # Eq. 7: ... + beta ⊙ ALG2(x_i^CF2), beta from GATE2
                aligned2 = self.alignment2(self.second_cf.items(batch.item[is_item]).float())
                fused = fused + self.gate2(aligned2, titles) * aligned2
            embeddings[is_item] = fused.to(dtype)
        if is_slot.any():  # CoLLM: the slot after the title is the aligned CF embedding, unfused
            embeddings[is_slot] = self.alignment(self.cf.items(batch.item[is_slot]).float()).to(dtype)
        return embeddings

    def decoder_parts(self) -> tuple[nn.Module, nn.Module]:
        """The causal LM under the LoRA wrapper, and its decoder stack (without the output layer)."""
        causal_lm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return causal_lm, getattr(causal_lm, causal_lm.base_model_prefix)

    def answer_log_probs(self, answer_hidden: torch.Tensor) -> Answer:
        """(B, d) final hidden states at the answer position -> log p_yes, log p_no, yes logit."""
        # The output layer on the answer position only, as one (B, d) @ (d, V) matmul: the LM's own head
        # on a (B, 1, d) slice pays for a copy of the whole (V, d) matrix per row.
        # It runs in float32: bf16 logits near 20 are 0.125 apart, which would round p_yes / p_no to a
        # few dozen distinct values and tie many rows' scores.
        causal_lm, _ = self.decoder_parts()
        head = causal_lm.get_output_embeddings()
        bias = None if head.bias is None else head.bias.float()
        logits = F.linear(answer_hidden.float(), float32_output_weight(head), bias)  # (B, V)
        return answer_from_logits(logits, self.yes_id, self.no_id)

    def forward(self, batch: PromptBatch) -> Answer:
        """log p_yes, log p_no under the full-vocabulary softmax at the answer position. -> (B,), (B,)"""
        _, decoder = self.decoder_parts()
        embeddings = self.input_embeddings(batch)
        hidden = run_decoder(decoder, embeddings, batch.attention_mask, self.compile_training)
        return self.answer_log_probs(hidden[:, -1])


def answer_from_logits(logits: torch.Tensor, yes_id: int, no_id: int) -> Answer:
    """(B, V) float32 logits at the answer position -> Answer."""
    log_probs = F.log_softmax(logits, dim=-1)  # the full-vocabulary softmax
    return Answer(log_probs[:, yes_id], log_probs[:, no_id], logits[:, yes_id])


def run_decoder(
    decoder: nn.Module, embeddings: torch.Tensor, attention_mask: torch.Tensor, compile: bool = False
) -> torch.Tensor:
    """Final hidden states of a left-padded batch run whole, without a cache. (B, T, d), (B, T) -> (B, T, d)

    With gradients on CPU the attention is recorded in its eager form (`attention_for_training`);
    with `compile`, gradients recorded through compiled layers (`run_compiled`).
    """

    def run() -> torch.Tensor:
        return decoder(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state

    with attention_for_training(decoder):
        return run_compiled(decoder, run) if compile else run()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token. (B, T) -> (B, T)

    With left padding this gives a prompt the same positions (and the same score) in any batch.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def click_score(log_p_yes: torch.Tensor, log_p_no: torch.Tensor) -> torch.Tensor:
    """Section 4.1: the normalised p_yes, p_yes / (p_yes + p_no)."""
    return torch.sigmoid(log_p_yes - log_p_no)


def normalised_p_yes(answer: Answer) -> torch.Tensor:
    return click_score(answer.log_p_yes, answer.log_p_no)


def ccf_loss(log_p_yes: torch.Tensor, log_p_no: torch.Tensor, label: torch.Tensor, k: float) -> torch.Tensor:
    """Eq. 5: BCE(p_yes, y) + BCE(p_no, 1 - y) + k · BPR(p_yes, p_no, y), averaged over the batch.

    BCE is on the probabilities themselves (computed from log-probabilities for stability); BPR asks
    p_yes > p_no for a positive row and the reverse for a negative: -log sigmoid(±(p_yes - p_no)).
    """
    bce_yes = -(label * log_p_yes + (1 - label) * _log1m_exp(log_p_yes))
    bce_no = -((1 - label) * log_p_no + label * _log1m_exp(log_p_no))
    sign = 2 * label - 1
    bpr = -F.logsigmoid(sign * (log_p_yes.exp() - log_p_no.exp()))
    return (bce_yes + bce_no + k * bpr).mean()


def eq5_loss(answer: Answer, label: torch.Tensor, k: float) -> torch.Tensor:
    return ccf_loss(answer.log_p_yes, answer.log_p_no, label, k)


def _log1m_exp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, stable for p near 0 and near 1."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -0.693, torch.log(-torch.expm1(log_p)), torch.log1p(-log_p.exp()))


# -- the method's record ----------------------------------------------------------------------------


def backbone_features(
    config: CCFConfig, backbone: CFModel | None, known_users: torch.Tensor, known_items: torch.Tensor
) -> CFFeatures:
    """x^CF from the run's trained backbone (Eq. 1), frozen unless the fusion stage tunes it."""
    if backbone is None:
        raise CCFLLMError(f"Method {config.method!r} fuses a CF backbone, and none was given.")
    backbone = backbone.eval().requires_grad_(False)
    return CFFeatures(backbone, known_users, known_items, with_bias=config.cf_features == "embedding+bias")


def _tuned_backbone(config: CCFConfig) -> tuple[str, ...]:
    return ("cf.backbone.",) if config.tune_cf else ()


BACKBONE = CFSource(
    "backbone", reads_backbone=True, features=backbone_features, trained=_tuned_backbone, tunable=True
)
EQ5 = Loss("eq5", eq5_loss, normalised_p_yes)
CCF_LLM = Method("ccf-llm", "CCF-LLM", prompt="fused", cf_source=BACKBONE, loss=EQ5, two_backbones=True)
