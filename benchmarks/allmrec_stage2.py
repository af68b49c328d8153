"""A-LLMRec's stage 2 with other settings, against SASRec on the same test rows: trains SASRec and
stage 1 as `ccfllm allmrec train` does, then stage 2 alone (no zero-shot, SBERT or TALLRec model),
and prints Hit@1 / Hit@5 / NDCG@10 of SASRec and A-LLMRec, stage 2's loss and the time of each part.

    .venv/bin/python benchmarks/allmrec_stage2.py --set stage2_positions=5

`--slots` asks whether the frozen LLM can name the candidate its soft tokens point to: each item
slot is fed a signal in place of the joint embedding e_i, trained and ranked as above.

- `joint` (the default): e_i itself, A-LLMRec as it is.
- `answer`: +1 in every dimension for the row's answer, -1 for every other item (history and
  candidates). An oracle: a pipeline that works must learn to name the marked title (Hit@1 near
  1); one that stays at chance cannot be steered through its slots at all.
- `sasrec`: the SASRec score of the user and the item (x_u . E_i), standardised over the row's
  slots, in every dimension. The LLM has only to name the candidate whose slot carries the highest
  number to match SASRec; what it loses against SASRec on the same rows is lost in reading the
  slots, not in comparing the user with the items.
- `graded`: a graded oracle, standard normal draws afresh for every prompt, the row's largest
  moved to the answer's slot. Where `answer` works and `sasrec` does not, this tells whether the
  LLM cannot pick the largest of 20 graded values, or can, and what fails with `sasrec` is
  learning from a score that puts the answer first only some of the time.
- `ranked`: the graded oracle's draws, but the answer's slot holds the value of the rank SASRec's
  score gives the answer among the row's candidates, counted over all slots: the largest where
  SASRec puts the answer first among the candidates (then it is the graded oracle), the second
  largest where one candidate scores above it, and so on. Same values as `graded`, the answer as
  often first as under SASRec: where `graded` is learnt and `ranked` is not, what fails with
  `sasrec` is how rarely its largest candidate is the answer.

For `sasrec` and `ranked` the script also prints how often SASRec's score is largest at the answer,
among all slots and among the candidates' slots, over the training prompts (in-sample for SASRec,
which trained on these positions) and the test prompts.

The signals other than `joint` read the answer or SASRec's scores: a diagnostic, no recommender.

`--slot-shares` stops after stage 1 and prints, over the test prompts, how often the answer's slot
scores highest among the prompt's item slots (its shown history and the candidates) and among the
candidates alone, by SASRec's x_u . E_i and by stage 1's x_u . f_I^dec(e_i): whether the joint
embeddings, like SASRec's, score the history above the answer.

Settings are AllmrecConfig's (`ccfllm allmrec train --help`) over the `cpu` preset.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ccfllm.cf.next_item import next_item_metrics, rank_candidates
from ccfllm.cli import CF_HISTORY
from ccfllm.config import parse_overrides
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.data.next_item import next_item_task, training_positions
from ccfllm.device import keep_freed_memory, resolve_device
from ccfllm.errors import CCFLLMError
from ccfllm.methods.allmrec import ALLMRec
from ccfllm.metrics import target_ranks
from ccfllm.next_item_config import allmrec_config
from ccfllm.next_item_experiment import (
    NOUNS,
    llm_ranks,
    load_task_llm,
    sample_split,
    stage2_settings,
    train_sasrec_and_alignment,
)
from ccfllm.next_item_prompt import NextItemPrompts
from ccfllm.next_item_train import train_stage2
from ccfllm.prompt import ITEM_SLOT, PromptBatch

SLOTS = ("joint", "answer", "sasrec", "graded", "ranked")


class SignalALLMRec(ALLMRec):
    """ALLMRec whose item slots carry F_I(signal) instead of F_I(e_i). For the `answer` signal, a
    training batch names each row's answer (`iid`, which next_title_loss fills with the target); a
    ranked row, whose batch does not, is found by its history in `answers` (history bytes -> answer)."""

    def __init__(self, *args, signal: str, answers: dict[bytes, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.signal, self.answers = signal, answers
        # per split and slots compared: [prompts where SASRec scores the answer highest, prompts]
        self.answer_first = {
            (split, among): [0, 0] for split in ("train", "test") for among in ("all slots", "candidates")
        }

    def input_embeddings(self, batch: PromptBatch, history: torch.Tensor) -> torch.Tensor:
        embeddings = super().input_embeddings(batch, history)
        if self.signal == "joint":
            return embeddings
        is_slot = batch.kind == ITEM_SLOT
        row, items = is_slot.nonzero()[:, 0], batch.item[is_slot]
        with torch.no_grad():
            values = self._slot_values(row, items, history, batch.iid)
        signal = values[:, None].expand(-1, self.alignment.latent_dim)
        embeddings[is_slot] = self.item_projection(signal).to(embeddings.dtype)
        return embeddings

    def _slot_values(
        self, row: torch.Tensor, items: torch.Tensor, history: torch.Tensor, iid: torch.Tensor
    ) -> torch.Tensor:
        if self.signal == "answer":
            return (items == self._answers(history, iid)[row]).float() * 2 - 1
        if self.signal == "graded":
            is_answer = items == self._answers(history, iid)[row]
            return _answer_at_rank(torch.randn(len(items), device=items.device), row, is_answer)
        score = self._sasrec_scores(row, items, history)
        is_answer = items == self._answers(history, iid)[row]
        is_candidate = ~(items[:, None] == history[row]).any(-1)  # candidates are never in the history
        split = "train" if self.training else "test"
        ranks = {}
        for among, compared in (("all slots", torch.ones_like(is_candidate)), ("candidates", is_candidate)):
            ranks[among] = _answer_ranks(score, row, is_answer, compared)
            counts = self.answer_first[split, among]
            counts[0], counts[1] = counts[0] + int((ranks[among] == 0).sum()), counts[1] + len(ranks[among])
        if self.signal == "ranked":
            draws = torch.randn(len(items), device=items.device)
            return _answer_at_rank(draws, row, is_answer, ranks["candidates"])
        standardised = torch.zeros_like(score)
        for r in row.unique():
            own = row == r
            standardised[own] = (score[own] - score[own].mean()) / score[own].std().clamp_min(1e-6)
        return standardised

    def _sasrec_scores(self, row: torch.Tensor, items: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        user = self.sasrec.user_embedding(
            torch.zeros(len(history), dtype=torch.long, device=history.device),
            history[:, -self.sasrec.config.max_history :],
        )
        return (user[row] * self.sasrec.item_embedding(items)).sum(-1).float()

    def _answers(self, history: torch.Tensor, iid: torch.Tensor) -> torch.Tensor:
        if bool((iid > 0).all()):
            return iid
        keys = history.cpu().numpy()
        return torch.as_tensor([self.answers[key.tobytes()] for key in keys], device=iid.device)


def _answer_ranks(
    score: torch.Tensor, row: torch.Tensor, is_answer: torch.Tensor, compared: torch.Tensor
) -> torch.Tensor:
    """Per row (in order of row id), how many of its `compared` slots score above its answer's (0: none).
    A row's answer fills one slot (it is a candidate, never in the history)."""
    return torch.stack(
        [(score[(row == r) & compared] > score[(row == r) & is_answer]).sum() for r in row.unique()]
    )


def _answer_at_rank(
    values: torch.Tensor, row: torch.Tensor, is_answer: torch.Tensor, rank: torch.Tensor | None = None
) -> torch.Tensor:
    """values with each row's (rank+1)-th largest (default: its largest) swapped into its answer slot."""
    values = values.clone()
    for k, r in enumerate(row.unique()):
        own = (row == r).nonzero()[:, 0]
        order = own[values[own].argsort(descending=True)]
        chosen, answer = order[0 if rank is None else int(rank[k])], own[is_answer[own]]
        values[chosen], values[answer] = values[answer].clone(), values[chosen].clone()
    return values


@torch.no_grad()
def decoded_ranks(sasrec, alignment, split) -> np.ndarray:
    """The answer's rank among each row's candidates by stage 1's score x_u . f_I^dec(e_i): the ranking
    the joint embeddings hold before any LLM reads them."""
    device = next(sasrec.parameters()).device
    history = torch.as_tensor(split.history[:, -sasrec.config.max_history :], device=device)
    user = sasrec.user_embedding(torch.zeros(len(history), dtype=torch.long, device=device), history)
    items = alignment.decoded_item(sasrec.item_embedding(torch.as_tensor(split.candidates, device=device)))
    return target_ranks(torch.einsum("bl,bcl->bc", user, items).cpu().numpy(), split.answer)


@torch.no_grad()
def answer_largest_shares(sasrec, alignment, split, shown: int) -> dict[str, tuple[float, float]]:
    """By SASRec's score and stage 1's: the share of rows whose answer scores highest among the
    prompt's item slots (the `shown` most recent history items and the candidates), and among the
    candidates alone (ties count against the answer)."""
    device = next(sasrec.parameters()).device
    history = torch.as_tensor(split.history, device=device)
    user = sasrec.user_embedding(
        torch.zeros(len(history), dtype=torch.long, device=device), history[:, -sasrec.config.max_history :]
    )
    candidates = torch.as_tensor(split.candidates, device=device)
    column = torch.as_tensor(split.answer, device=device)  # the answer's column in `candidates`
    recent = history[:, -shown:]
    scorers = {
        "SASRec's x_u . E_i": sasrec.item_embedding,
        "stage 1's x_u . f_I^dec(e_i)": lambda items: alignment.decoded_item(sasrec.item_embedding(items)),
    }
    shares = {}
    for name, embed in scorers.items():
        candidate_scores = torch.einsum("bl,bcl->bc", user, embed(candidates))
        history_scores = torch.einsum("bl,bhl->bh", user, embed(recent)).masked_fill(recent == 0, -torch.inf)
        answer_score = candidate_scores.gather(1, column[:, None])[:, 0]
        others = candidate_scores.scatter(1, column[:, None], -torch.inf).max(1).values
        first_among_candidates = answer_score > others
        first_of_all = first_among_candidates & (answer_score > history_scores.max(1).values)
        shares[name] = (first_of_all.float().mean().item(), first_among_candidates.float().mean().item())
    return shares


def answer_lookup(split) -> dict[bytes, int]:
    """History bytes -> target over the split's rows (each row's history must identify it)."""
    lookup: dict[bytes, int] = {}
    for history, target in zip(split.history, split.target, strict=True):
        key = np.ascontiguousarray(history, dtype=np.int64).tobytes()
        if lookup.setdefault(key, int(target)) != int(target):
            raise SystemExit(f"two {split.name} rows share a history with different answers")
    return lookup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", choices=SLOTS, default="joint", help="what the item slots carry")
    parser.add_argument("--data", default=None)
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--slot-shares", action="store_true", help="stop after stage 1; see above")
    args = parser.parse_args()
    try:
        changed = parse_overrides(args.settings)
        config = allmrec_config("cpu", **changed)
        dataset = load_collm_split(resolve_data_dir(args.data), max_history=CF_HISTORY)
    except CCFLLMError as exc:
        parser.error(str(exc))
    keep_freed_memory()
    task = next_item_task(
        dataset, config.n_candidates, config.seed, config.sasrec_history, config.cold_user_share
    )
    test = sample_split(task.splits["test"], config.test_rows, config.seed)
    device = resolve_device(config.device)
    timings: dict[str, float] = {}
    sasrec, stage1, _ = train_sasrec_and_alignment(config, task, device, timings)
    if args.slot_shares:
        shares = answer_largest_shares(sasrec, stage1.alignment, test, config.prompt_history)
        print(f"\n{len(test)} test prompts; the answer's slot scores highest among")
        print("| score | all item slots (shown history and candidates) | the candidates |\n|---|---|---|")
        for name, (of_all, of_candidates) in shares.items():
            print(f"| {name} | {of_all:.4f} | {of_candidates:.4f} |")
        return

    llm = load_task_llm(config)
    prompts = NextItemPrompts(
        llm.tokenizer, task.item_titles, NOUNS.get(dataset.domain, "item"), config.prompt_history
    )
    model = SignalALLMRec(
        llm.model,
        sasrec,
        stage1.alignment,
        config.hidden,
        signal=args.slots,
        answers=answer_lookup(test) if args.slots != "joint" else {},
    ).to(device)
    rows = len(training_positions(task, config.stage2_positions))
    clock = time.perf_counter()
    losses = train_stage2(model, prompts, task, **stage2_settings(config)).losses
    timings["stage2_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ranks = {
        "SASRec": rank_candidates(sasrec, test),
        "stage 1's score x_u . f_I^dec(e_i), no LLM": decoded_ranks(sasrec, stage1.alignment, test),
        "A-LLMRec" + ("" if args.slots == "joint" else f", slots carry: {args.slots}"): llm_ranks(
            model, prompts, test, config, progress=True
        ),
    }
    timings["inference_s"] = time.perf_counter() - clock

    print(f"\nA-LLMRec stage 2, slots carry {args.slots!r}, on {task.name}, cpu preset with "
          f"{changed or 'nothing'} changed")  # fmt: skip
    print(f"stage 2: {rows} training rows available, {len(losses)} steps of {config.stage2_batch}")
    window = min(50, len(losses))
    print(
        f"next-title loss per token: first {window} steps {np.mean(losses[:window]):.3f}, "
        f"last {window} {np.mean(losses[-window:]):.3f}"
    )
    chance = 1 / config.n_candidates
    standard_error = np.sqrt(chance * (1 - chance) / len(test))
    print(f"\n{len(test)} test rows, {config.n_candidates} candidates: chance Hit@1 {chance:.3f} "
          f"(one standard error {standard_error:.3f})")  # fmt: skip
    print("| model | Hit@1 | Hit@5 | NDCG@10 |\n|---|---|---|---|")
    for name, model_ranks in ranks.items():
        metrics = next_item_metrics(model_ranks)
        print(f"| {name} | {metrics['hit@1']:.4f} | {metrics['hit@5']:.4f} | {metrics['ndcg@10']:.4f} |")
    for (prompts_of, among), (first, total) in model.answer_first.items():
        if total:
            share = first / total
            print(
                f"SASRec scores the answer highest among {among}: {share:.4f} of {total} {prompts_of} prompts"
            )
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
