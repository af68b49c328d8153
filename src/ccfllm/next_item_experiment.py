"""A-LLMRec from a dataset to an evaluated run on the next-item task: SASRec, stage 1 (alignment),
stage 2 (soft prompts into the frozen LLM), and Hit@k / NDCG@k on the test split for SASRec alone, the
LLM alone (zero-shot, titles only), A-LLMRec (or MLP-LLM), A-LLMRec(SBERT) and a TALLRec-style LoRA
model on the same prompt without soft tokens, over all test rows and over the rows whose answer is a
cold or a warm item; and the training and inference time of A-LLMRec against that TALLRec model.

A run folder holds config.json (run_folder.py's record, of kind 'allmrec'), metrics.json (the table
and the training curves) and the trained parts
in safetensors: SASRec, the alignment, the projections, and the items' sentence embeddings (the
fine-tuned encoder's output, which is all that A-LLMRec(SBERT) reads).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .cf.next_item import next_item_metrics, rank_candidates, train_next_item_sasrec
from .cf.sasrec import SASRec
from .config import cf_config, replace_checked
from .data.dataset import CTRDataset, refuse_other_dataset
from .data.next_item import NextItemSplit, NextItemTask, next_item_task
from .device import resolve_device
from .errors import CheckpointError
from .io import atomic_path, read_safetensors
from .llm import add_lora, load_llm
from .llm_source import check_llm_source
from .methods.allmrec import ALLMRec, CollaborativeTextAlignment, ask, item_text_embeddings, joint_space_check
from .metrics import target_ranks
from .next_item_config import AllmrecConfig
from .next_item_prompt import GENRE_QUESTION, NextItemPrompts
from .next_item_scoring import candidate_scores
from .next_item_train import AlignmentResult, train_alignment, train_stage2
from .partial import drop_if_nothing_finished, open_partial_folder, progress_file, read_part, save_part
from .run_folder import ALLMREC, read_run_record, require_file, write_metrics, write_run_record
from .text_encoder import encoder_folder, load_sentence_encoder
from .train import sample_rows

NOUNS = {"movies": "movie", "books": "book"}


@dataclass
class AllmrecResult:
    folder: Path
    table: list[dict]  # per model: Hit@1 / Hit@5 / NDCG@10 over all test rows, Hit@1 on cold / warm answers
    timings: dict  # seconds of each part, and A-LLMRec's speed-ups over the TALLRec baseline
    seconds: float


def run_allmrec(
    config: AllmrecConfig,
    dataset: CTRDataset,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> AllmrecResult:
    """The whole run, each part timed into the run's timings. Until it ends, the run keeps each
    finished part (SASRec and stage 1, the zero-shot ranking, stage 2 with its rankings) in
    OUT.partial; with `resume` the parts an interrupted run with the same settings left there are
    loaded instead of done again, and the run ends as the unbroken one would."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite.")
    check_llm_source(config.llm, config.allow_download)  # before SASRec trains, not minutes later
    work = open_partial_folder(out, config, dataset, resume, overwrite)
    try:
        with atomic_path(out) as folder:
            folder.mkdir()
            table, timings = _run_parts(config, dataset, work / "parts", folder, progress)
    except BaseException:
        drop_if_nothing_finished(work, (work / "parts").glob("*"))
        raise
    shutil.rmtree(work)
    return AllmrecResult(out, table, timings, time.perf_counter() - started)


@dataclass
class _Measure:
    """What every row of the table is measured on: the sampled test rows, their answers' popularity
    groups (-1 cold, 1 warm) and the held-out cold users."""

    config: AllmrecConfig
    test: NextItemSplit
    groups: np.ndarray
    cold_users: NextItemSplit | None
    progress: bool

    def row(self, name: str, ranks_of) -> dict:
        """The table's row for a model whose `ranks_of(split)` gives the answers' ranks."""
        cold_user_ranks = ranks_of(self.cold_users) if self.cold_users else None
        return _row(name, ranks_of(self.test), self.groups, cold_user_ranks)

    def by_llm(self, model: ALLMRec, prompts: NextItemPrompts, test_ranks: np.ndarray | None = None):
        """ranks_of for an LLM model; `test_ranks` where the test rows are ranked (and timed) already."""
        return lambda split: (
            test_ranks
            if split is self.test and test_ranks is not None
            else llm_ranks(model, prompts, split, self.config, self.progress)
        )


def _run_parts(
    config: AllmrecConfig, dataset: CTRDataset, parts: Path, folder: Path, progress: bool
) -> tuple[list[dict], dict]:
    """SASRec and stage 1, the LLM alone, stage 2, TALLRec; each finished part but the last is kept
    under `parts` (or loaded from there); the finished run is saved in `folder`."""
    task = next_item_task(
        dataset, config.n_candidates, config.seed, config.sasrec_history, config.cold_user_share
    )
    test = sample_split(task.splits["test"], config.test_rows, config.seed)
    groups = task.item_popularity_group()[test.target]
    measure = _Measure(config, test, groups, task.splits.get("cold_users"), progress)
    device = resolve_device(config.device)

    sasrec, alignment, text_items, record = _sasrec_stage1_part(
        parts / "1-sasrec-stage1", config, task, device, progress
    )
    timings, stage1_losses = dict(record["timings"]), record["stage1_losses"]
    table = [measure.row("SASRec", lambda split: rank_candidates(sasrec, split))]
    joint_space = joint_space_check(alignment, sasrec, text_items)

    llm = load_task_llm(config)
    noun = NOUNS.get(dataset.domain, "item")
    soft = NextItemPrompts(llm.tokenizer, task.item_titles, noun, config.prompt_history)
    plain = NextItemPrompts(llm.tokenizer, task.item_titles, noun, config.prompt_history, soft=False)
    model = ALLMRec(llm.model, sasrec, alignment, config.hidden).to(device)
    record = _zero_shot_part(parts / "2-zero-shot", model, plain, measure)
    table.append(record["row"])
    timings.update(record["timings"])
    record = _stage2_part(parts / "3-stage2", model, soft, task, text_items, measure, device)
    table += record["rows"]
    timings.update(record["timings"])
    model.text_items = text_items

    tallrec, tallrec_ranks = _tallrec(parts / "4-tallrec", measure, task, sasrec, alignment, plain, timings)
    table.append(measure.row("TALLRec (LoRA, titles)", measure.by_llm(tallrec, plain, tallrec_ranks)))
    timings["train_speedup_vs_tallrec"] = timings["tallrec_train_s"] / timings["stage2_s"]
    timings["inference_speedup_vs_tallrec"] = timings["tallrec_inference_s"] / timings["inference_s"]

    _save(folder, config, model, dataset, table, timings, stage1_losses, joint_space, record["stage2_losses"])
    return table, timings


def _sasrec_stage1_part(
    part: Path, config: AllmrecConfig, task: NextItemTask, device: torch.device, progress: bool
) -> tuple[SASRec, CollaborativeTextAlignment, torch.Tensor, dict]:
    """SASRec and stage 1, trained and kept in `part`, or loaded from there. -> SASRec, the alignment,
    Q_i of every item, and the part's record (its timings and stage 1's losses)."""
    if part.is_dir():
        sasrec, alignment, text_items = (x.to(device) for x in _rebuild_stage1(part, config, task))
        record = _resume_from(part, device)  # after building the modules, which draws their first weights
        return sasrec, alignment, text_items, record
    timings = {}
    sasrec, stage1, text_items = train_sasrec_and_alignment(config, task, device, timings, progress)
    record = {"timings": timings, "stage1_losses": stage1.losses}
    _save_part(part, record, device, sasrec=sasrec, alignment=stage1.alignment, item_texts=text_items)
    return sasrec, stage1.alignment, text_items, record


def _zero_shot_part(part: Path, model: ALLMRec, plain: NextItemPrompts, measure: _Measure) -> dict:
    """The LLM alone on the titles-only prompt, ranked and timed, kept in `part` or loaded from there."""
    if part.is_dir():
        return read_part(part)[0]
    clock = time.perf_counter()
    record = {"row": measure.row("LLM alone (zero-shot, titles)", measure.by_llm(model, plain))}
    record["timings"] = {"zero_shot_inference_s": time.perf_counter() - clock}
    _save_part(part, record)
    return record


def _stage2_part(
    part: Path,
    model: ALLMRec,
    soft: NextItemPrompts,
    task: NextItemTask,
    text_items: torch.Tensor,
    measure: _Measure,
    device: torch.device,
) -> dict:
    """Stage 2 (going on from its saved progress where an interrupted run left some), then A-LLMRec's
    (or MLP-LLM's) rows, its genre answers and A-LLMRec(SBERT)'s row; kept in `part` with the trained
    projections, or loaded from there into `model`. -> the part's record."""
    if part.is_dir():
        record = _resume_from(part, device)
        _load_projections(part, model)
        return record
    config, test = measure.config, measure.test
    in_progress = progress_file(part)
    trained = train_stage2(
        model, soft, task, **stage2_settings(config), progress=measure.progress, progress_file=in_progress
    )
    timings = {"stage2_s": trained.seconds}
    clock = time.perf_counter()
    ranks = llm_ranks(model, soft, test, config, measure.progress)
    timings["inference_s"] = time.perf_counter() - clock
    name = "MLP-LLM" if config.variant == "mlp-llm" else "A-LLMRec"
    rows = [measure.row(name, measure.by_llm(model, soft, ranks))]
    timings["generation"] = [
        {"uid": int(u), "question": GENRE_QUESTION, "answer": ask(model, soft, h)}
        for u, h in zip(test.uid[:3], test.history[:3], strict=True)
    ]
    model.text_items = text_items
    rows.append(measure.row(f"{name} (SBERT)", measure.by_llm(model, soft)))
    record = {"rows": rows, "timings": timings, "stage2_losses": trained.losses}
    projections = {"user_projection": model.user_projection, "item_projection": model.item_projection}
    _save_part(part, record, device, **projections)
    in_progress.unlink(missing_ok=True)
    return record


def _save_part(folder: Path, record: dict, device: torch.device | None = None, **weights) -> None:
    """A finished part: its JSON `record`, the `weights` (modules or tensors) it trained, and where it
    drew random numbers (`device` given), the random-number state after it."""

    def write_weights(tmp: Path) -> None:
        for name, value in weights.items():
            _save_weights(tmp, name, value)

    save_part(folder, record, device=device, write_weights=write_weights)


def _resume_from(folder: Path, device: torch.device) -> dict:
    """A finished part's record, with the random-number state it ended with restored."""
    return read_part(folder, device)[0]


def train_sasrec_and_alignment(
    config: AllmrecConfig, task: NextItemTask, device: torch.device, timings: dict, progress: bool = True
) -> tuple[SASRec, AlignmentResult, torch.Tensor]:
    """SASRec trained for the next item, then stage 1 (the alignment) on it, each timed into `timings`.
    -> SASRec, stage 1's result, and Q_i of every item from the (fine-tuned) sentence encoder."""
    encoder_folder(config.encoder)  # a missing encoder fails before SASRec trains, not minutes later
    clock = time.perf_counter()
    sasrec_config = cf_config(
        "sasrec",
        dim=config.sasrec_dim,
        max_history=config.sasrec_history,
        max_epochs=config.sasrec_epochs,
        seed=config.seed,
        device=str(device),
    )
    sasrec = train_next_item_sasrec(sasrec_config, task, progress).model
    timings["sasrec_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    encoder = load_sentence_encoder(config.encoder, device)
    stage1 = train_alignment(
        task,
        sasrec,
        encoder,
        latent_dim=config.latent_dim,
        hidden=config.hidden,
        latent_norm=config.latent_norm,
        scale_inputs=config.scale_inputs,
        alpha=config.alpha,
        beta=config.beta,
        lr=config.stage1_lr,
        batch_size=config.stage1_batch,
        epochs=config.stage1_epochs,
        freeze_text=config.freeze_text,
        matching=0.0 if config.variant == "mlp-llm" else 1.0,
        seed=config.seed,
        progress=progress,
    )
    timings["stage1_s"] = time.perf_counter() - clock
    with torch.no_grad():
        text_items = item_text_embeddings(encoder, task)
    return sasrec, stage1, text_items


def _tallrec(
    part: Path,
    measure: _Measure,
    task: NextItemTask,
    sasrec: SASRec,
    alignment: CollaborativeTextAlignment,
    plain: NextItemPrompts,
    timings: dict,
) -> tuple[ALLMRec, np.ndarray]:
    """The TALLRec-style baseline on the same task: a fresh copy of the LLM tuned with LoRA on the
    titles-only prompt, with the same loss, rows and epochs as stage 2 (its training goes on from
    the progress file of `part` where an interrupted run left one). -> the model and its test ranks;
    its training and its inference of the test split are timed."""
    config, progress = measure.config, measure.progress
    llm = load_task_llm(config)
    tuned = add_lora(llm.model)
    model = ALLMRec(tuned, sasrec, alignment, config.hidden).to(next(sasrec.parameters()).device)
    lora = [p for n, p in tuned.named_parameters() if "lora_" in n]
    for parameter in lora:
        parameter.requires_grad_(True)
    settings = dict(
        parameters=lora, progress=progress, progress_file=progress_file(part), label="TALLRec baseline"
    )
    timings["tallrec_train_s"] = train_stage2(
        model, plain, task, **stage2_settings(config), **settings
    ).seconds
    clock = time.perf_counter()
    ranks = llm_ranks(model, plain, measure.test, config, progress)
    timings["tallrec_inference_s"] = time.perf_counter() - clock
    return model, ranks


def load_task_llm(config: AllmrecConfig, device: str | None = None):
    """The LLM the config names (on `device` where given): kept frozen by A-LLMRec, LoRA-tuned by TALLRec."""
    return load_llm(
        config.llm, device=device or config.device, dtype=config.dtype, allow_download=config.allow_download
    )


def stage2_settings(config: AllmrecConfig) -> dict:
    """What A-LLMRec's stage 2 and the TALLRec baseline share: the same rows, steps and learning rate."""
    return dict(
        lr=config.stage2_lr,
        batch_size=config.stage2_batch,
        epochs=config.stage2_epochs,
        n_candidates=config.n_candidates,
        seed=config.seed,
        rows=config.stage2_rows,
        positions=config.stage2_positions,
        compile=config.compile_training,
    )


def llm_ranks(
    model: ALLMRec, prompts: NextItemPrompts, split: NextItemSplit, config: AllmrecConfig, progress: bool
) -> np.ndarray:
    """Each row's rank of its answer among its candidates, by the LLM's candidate scores (0: first)."""
    scores = candidate_scores(model, prompts, split, batch_size=config.rank_batch, progress=progress)
    return target_ranks(scores, split.answer)


def _row(model: str, ranks: np.ndarray, groups: np.ndarray, cold_user_ranks: np.ndarray | None) -> dict:
    """The table's metrics for one model's ranks: all test rows, the cold- and warm-answer rows, and
    the held-out cold users."""
    metrics = next_item_metrics(ranks)
    return {
        "model": model,
        "rows": len(ranks),
        **{k: metrics[k] for k in ("hit@1", "hit@5", "ndcg@10")},
        "hit@1 cold": float((ranks[groups == -1] == 0).mean()) if (groups == -1).any() else None,
        "hit@1 warm": float((ranks[groups == 1] == 0).mean()) if (groups == 1).any() else None,
        "hit@1 cold users": None if cold_user_ranks is None else float((cold_user_ranks == 0).mean()),
        "rows cold": int((groups == -1).sum()),
        "rows warm": int((groups == 1).sum()),
        "rows cold users": 0 if cold_user_ranks is None else len(cold_user_ranks),
    }


def sample_split(split: NextItemSplit, rows: int, seed: int) -> NextItemSplit:
    """A seeded sample of `rows` of the split's rows, in order (all of them where rows is 0 or too many)."""
    if rows == 0 or rows >= len(split):
        return split
    chosen = sample_rows(len(split), rows, np.random.default_rng(seed + 2))
    fields = ("uid", "history", "target", "candidates")
    return NextItemSplit(split.name, *(getattr(split, f)[chosen] for f in fields))


def _save(
    folder: Path, config, model: ALLMRec, dataset, table, timings, stage1_losses, joint_space, stage2_losses
) -> None:
    for name in ("sasrec", "alignment", "user_projection", "item_projection"):
        _save_weights(folder, name, getattr(model, name))
    _save_weights(folder, "item_texts", model.text_items)
    write_run_record(folder, ALLMREC, config, dataset)
    metrics = {
        "table": table,
        "timings": timings,
        "stage1": stage1_losses,
        "joint_space": joint_space,
        "stage2_losses": stage2_losses,
    }
    write_metrics(folder, metrics)


def _save_weights(folder: Path, name: str, value: torch.nn.Module | torch.Tensor) -> None:
    """`folder`/NAME.safetensors: a module's state, or Q_i as {"text_items": tensor}."""
    state = value.state_dict() if isinstance(value, torch.nn.Module) else {"text_items": value}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")


@dataclass
class LoadedAllmrec:
    model: ALLMRec
    prompts: NextItemPrompts
    task: NextItemTask
    config: AllmrecConfig
    text_items: torch.Tensor  # Q_i of every item, for A-LLMRec(SBERT)


def load_allmrec(folder: str | Path, dataset: CTRDataset, device: str = "auto") -> LoadedAllmrec:
    """Rebuild a saved A-LLMRec run: the same task (it is seeded), SASRec, the alignment, the projections."""
    folder = Path(folder)
    record = read_run_record(folder, ALLMREC)
    refuse_other_dataset(folder, record["dataset"], dataset)
    config = replace_checked(AllmrecConfig(), {**record["config"], "device": device})
    task = next_item_task(
        dataset, config.n_candidates, config.seed, config.sasrec_history, config.cold_user_share
    )
    torch_device = resolve_device(device)
    sasrec, alignment, text_items = _rebuild_stage1(folder, config, task)
    llm = load_task_llm(config, device)
    model = ALLMRec(llm.model, sasrec.to(torch_device), alignment.to(torch_device), config.hidden)
    _load_projections(folder, model)
    prompts = NextItemPrompts(
        llm.tokenizer, task.item_titles, NOUNS.get(dataset.domain, "item"), config.prompt_history
    )
    return LoadedAllmrec(model.to(torch_device).eval(), prompts, task, config, text_items.to(torch_device))


def _rebuild_stage1(
    folder: Path, config: AllmrecConfig, task: NextItemTask
) -> tuple[SASRec, CollaborativeTextAlignment, torch.Tensor]:
    """SASRec, the alignment and Q_i as saved in `folder` (a run, or its finished first part), on CPU."""
    sasrec_config = cf_config("sasrec", dim=config.sasrec_dim, max_history=config.sasrec_history)
    sasrec = SASRec(sasrec_config, int(max(task.sequences)) + 1, task.n_items)
    sasrec.load_state_dict(_weights(folder, "sasrec"))
    text_items = _weights(folder, "item_texts")["text_items"]
    alignment = CollaborativeTextAlignment(
        config.sasrec_dim, text_items.shape[1], config.latent_dim, config.hidden, config.latent_norm
    )
    alignment.load_state_dict(_weights(folder, "alignment"))
    return sasrec, alignment, text_items


def _load_projections(folder: Path, model: ALLMRec) -> None:
    model.user_projection.load_state_dict(_weights(folder, "user_projection"))
    model.item_projection.load_state_dict(_weights(folder, "item_projection"))


def evaluate_allmrec(run: LoadedAllmrec, split: str = "test", progress: bool = True) -> dict[str, dict]:
    """Hit@k and NDCG@k of A-LLMRec and A-LLMRec(SBERT) on a split of the run's task."""
    rows = run.task.splits[split]
    if split == "test":
        rows = sample_split(rows, run.config.test_rows, run.config.seed)
    results = {}
    for name, text_items in (("A-LLMRec", None), ("A-LLMRec (SBERT)", run.text_items)):
        run.model.text_items = text_items
        results[name] = next_item_metrics(llm_ranks(run.model, run.prompts, rows, run.config, progress))
    run.model.text_items = None
    return results


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return read_safetensors(require_file(folder / f"{name}.safetensors"))
