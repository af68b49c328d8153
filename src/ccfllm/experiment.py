"""CCF-LLM from a dataset to a saved, evaluated run: the CF backbone, the LLM with LoRA, the stages
that the strategy names, test scores after each, and a run folder that reloads to the same scores.

A run folder holds
  cf/                     the CF backbone (when the run trained it; otherwise config.json names it)
  adapter/                the LoRA adapter, in PEFT's format (adapter_model.safetensors)
  fusion.safetensors      ALG and GATE (and the backbone's weights, if it was tuned)
  config.json             the CCFConfig, the LLM's fingerprint, the CF checkpoint, the dataset, the
                          provenance (run_folder.py: the one format of every run's record)
  metrics.json            valid/test AUC and UAUC after each stage, the training curves, timings
  predictions.parquet     uid, iid, label, score on the test split, from the final model

Until it is done, a run works in OUT.partial beside OUT, which keeps what it has finished: the backbone
it trained (cf/), and each stage's weights, result, test scores and random-number state
(stages/N-STAGE/, a finished part as partial.save_part writes it); and, while a stage trains, its
state at its last validation (stages/N-STAGE.progress.safetensors). An interrupted run leaves that
folder; `resume=True` (`ccfllm train --resume`) continues it with the same settings, from the last
validation of the stage it stopped in, and ends where an uninterrupted run would, to the digit.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import schedule
from .cf.base import CFModel
from .cf.checkpoint import load_cf, save_cf
from .cf.reference import reference_scores
from .cf.train import evaluate_cf, predict_split, train_cf
from .config import CCFConfig, CFConfig, cf_config
from .data.dataset import CTRDataset, Split
from .distributed import SINGLE, World, check_global_batch, current_world
from .engine import score_rows
from .errors import CheckpointError
from .io import atomic_path
from .llm import load_llm
from .methods import METHODS, uses_backbone
from .metrics import paired_bootstrap, split_metrics
from .partial import drop_if_nothing_finished, open_partial_folder, progress_file, read_part, save_part
from .recommender import (
    Recommender,
    build_recommender,
    llm_arguments,
    load_adapter,
    load_weights,
    read_run_config,
    save_weights,
)
from .run_folder import CCF_LLM, read_metrics, write_metrics, write_run_record
from .schedule import STAGE1_SETTINGS, Stage, stage1_signature
from .train import StageResult, sample_rows, train_stage


@dataclass
class RunResult:
    folder: Path
    table: list[dict]  # one row per model: name, test AUC, test UAUC, valid AUC
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0
    significance: list[dict] = field(default_factory=list)  # the final model against each backbone


def run_ccf_llm(
    config: CCFConfig,
    dataset: CTRDataset,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    world: World | None = None,
) -> RunResult:
    """The whole method: backbone, stages per `config.strategy`, test after each, saved run. With
    `resume`, the finished parts an interrupted run with the same settings left in OUT.partial are
    loaded instead of trained again. Under a launcher (`world`: by default the launched processes,
    `distributed.current_world`), the ranks share each batch and each scoring; rank 0 writes."""
    started = time.perf_counter()
    world = world or current_world(config.device)
    check_global_batch(config.batch_size, world)
    progress = progress and world.is_main
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite.")
    if config.stage1_from:
        check_stage1_donor(config, Path(config.stage1_from))  # before any training
    work = open_partial_folder(out, config, dataset, resume, overwrite, world)
    try:
        result = _run_stages(config, dataset, work, progress, world)
        if world.is_main:
            _save_run_folder(out, work, result)
        world.barrier()  # no rank ends well before the run is saved
    except BaseException:
        if world.is_main:
            drop_if_nothing_finished(work, [work / "cf", work / "cf2", *(work / "stages").glob("*")])
        raise
    if world.is_main:
        shutil.rmtree(work)
    seconds = time.perf_counter() - started
    return RunResult(out, result["table"], result["stages"], seconds, result["significance"])


def _save_run_folder(out: Path, work: Path, result: dict) -> None:
    """The finished run at `out`, atomically: the backbones `work` holds, weights, records, scores."""
    with atomic_path(out) as folder:
        folder.mkdir()
        for backbone_folder in ("cf", "cf2"):
            if (work / backbone_folder).is_dir():
                shutil.copytree(work / backbone_folder, folder / backbone_folder)
        _save_run(folder=folder, **result)


def _run_stages(
    config: CCFConfig, dataset: CTRDataset, work: Path, progress: bool, world: World = SINGLE
) -> dict:
    """Train (or load from `work`, where an interrupted run finished them) the backbones and the stages,
    scoring the test split after each; -> what _save_run writes."""
    test = test_split(dataset, config)
    method = METHODS[config.method]
    llm = load_llm(**llm_arguments(config, world))  # before the backbone: a bad --llm fails at once
    table, backbones, cf_references, backbone_scores = [], [], [], []
    names = [n for n in (config.cf_model, config.cf_model2) if n] if uses_backbone(method) else []
    for number, name in enumerate(names):
        backbone, reference = _backbone(config, dataset, work, progress, number == 1, world)
        scores = predict_split(backbone, test)
        table.append({"model": f"{name} (CF backbone alone)", **_metrics(test, scores)})
        backbones.append(backbone)
        cf_references.append(reference)
        backbone_scores.append((table[-1]["model"], scores))
    reference = reference_scores(dataset, test, 5.0)
    table.append({"model": "mean-label reference (k=5)", **_metrics(test, reference)})
    first, second = (backbones + [None, None])[:2]
    recommender = build_recommender(config, dataset, first, llm, second)
    if world.rank:  # each rank draws its own dropout masks; rank 0 the ones of a single process
        torch.manual_seed(config.seed + world.rank)
    stages, resumed = [], []
    for number, stage in enumerate(schedule.stages(config.strategy), 1):
        prompts = recommender.prompts_for(stage)
        last = number == len(schedule.stages(config.strategy))
        row = {"model": f"{method.title} after stage {stage.value}"}
        finished = work / "stages" / f"{number}-{stage.value}"
        in_progress = progress_file(finished)  # the stage's state at its last validation
        if finished.is_dir():
            result, row, scores = _load_stage(recommender, finished, world)
            stages.append(result)
            table.append(row)
            resumed.append(stage.value)
            if progress:
                tqdm.write(
                    f"stage {stage.value}: loaded from {finished} (valid AUC {result.best_valid_auc:.4f})"
                )
            continue
        if stage == Stage.LORA and config.stage1_from:
            stages.append(reuse_stage1(recommender, Path(config.stage1_from)))
            if not last:  # the donor scored the same weights on the same rows
                table.append({**row, **_donor_stage1_row(Path(config.stage1_from))})
                continue
        else:
            data = (dataset.train, dataset.valid)
            model = recommender.model
            stages.append(
                train_stage(model, stage, prompts, *data, config, progress, None, in_progress, world)
            )
        scores = score_rows(
            recommender.model, prompts, test, None, config.eval_batch_size, progress, world=world
        )
        table.append({**row, **_metrics(test, scores)})
        _save_stage(recommender, finished, stages[-1], table[-1], scores, world)
        if world.is_main:
            in_progress.unlink(missing_ok=True)
    if not stages:  # zero-shot: the LLM as it comes, reading the method's prompt
        prompts = recommender.final_prompts()
        scores = score_rows(
            recommender.model, prompts, test, None, config.eval_batch_size, progress, world=world
        )
        table.append({"model": f"{method.title} zero-shot", **_metrics(test, scores)})
    significance = [
        significance_row(test, table[-1]["model"], scores, name, base) for name, base in backbone_scores
    ]
    return dict(
        recommender=recommender,
        dataset=dataset,
        cf_references=cf_references,
        table=table,
        stages=stages,
        resumed=resumed,
        test=test,
        scores=scores,
        significance=significance,
    )


# -- an interrupted run's finished parts (OUT.partial) ----------------------------------------------


def _save_stage(
    recommender: Recommender, folder: Path, result: StageResult, row: dict, scores, world: World = SINGLE
) -> None:
    """A finished stage: its weights, result, test row and scores, and the random-number state after it
    (every rank's, gathered; rank 0 writes)."""
    save_part(
        folder,
        {"result": vars(result), "row": row},
        tensors={"test_scores": torch.as_tensor(np.asarray(scores))},
        device=recommender.llm.model.device,
        write_weights=lambda tmp: save_weights(recommender, tmp),
        world=world,
    )


def _load_stage(
    recommender: Recommender, folder: Path, world: World = SINGLE
) -> tuple[StageResult, dict, np.ndarray]:
    load_weights(recommender, folder)
    record, state = read_part(folder, recommender.llm.model.device, world)
    return StageResult(**record["result"]), record["row"], state["test_scores"].numpy()


def check_stage1_donor(config: CCFConfig, donor: Path) -> None:
    """Refuse a donor run that did not train the stage 1 `config` asks for."""
    wanted, given = stage1_signature(config), stage1_signature(read_run_config(donor)["config"])
    if wanted is None or given is None or wanted != given:
        differ = sorted(k for k in STAGE1_SETTINGS if (wanted or {}).get(k) != (given or {}).get(k))
        raise CheckpointError(
            f"{donor} did not train the stage 1 this run needs (both must read the text prompt and end "
            f"with their stage-1 adapter; settings that differ: {differ or 'strategy or stage1_prompt'})."
        )


def reuse_stage1(recommender: Recommender, donor: Path) -> StageResult:
    """Load a donor run's stage-1 LoRA adapter into `recommender`; its stage-1 result stands for ours."""
    check_stage1_donor(recommender.config, donor)
    load_adapter(recommender, donor)
    stages = read_metrics(donor)["stages"]
    return StageResult(**{**stages[0], "seconds": 0.0})


def _donor_stage1_row(donor: Path) -> dict:
    table = read_metrics(donor)["table"]
    row = next(r for r in table if r["model"].endswith("after stage lora"))
    return {"test_auc": row["test_auc"], "test_uauc": row["test_uauc"], "reused_from": str(donor)}


# -- pieces -----------------------------------------------------------------------------------------


def _backbone(
    config: CCFConfig,
    dataset: CTRDataset,
    folder: Path,
    progress: bool,
    second: bool = False,
    world: World = SINGLE,
) -> tuple[CFModel, str]:
    """The named CF checkpoint, or a backbone trained now with its preset and saved under cf/ (the
    second backbone of Eq. 7: cf2/). Under a launcher rank 0 trains it and the others read it: a
    backbone trains in seconds to minutes on a CPU, where sharing its batches would all-reduce its
    whole embedding tables at every step."""
    name, checkpoint = (
        (config.cf_model2, config.cf_checkpoint2) if second else (config.cf_model, config.cf_checkpoint)
    )
    if checkpoint:
        model = load_cf(checkpoint, dataset=dataset, expect_model=name, device="cpu")
        return model, str(Path(checkpoint).resolve())
    subfolder = "cf2" if second else "cf"
    trained_before = (folder / subfolder).is_dir()  # an interrupted run trained it already
    world.barrier()  # every rank has looked before rank 0 writes it
    if not trained_before and world.is_main:
        model = train_backbone(config, dataset, folder / subfolder, progress, name)
    world.barrier()  # rank 0 has saved it
    if trained_before or not world.is_main:
        model = load_cf(folder / subfolder, dataset=dataset, expect_model=name, device="cpu")
    return model, subfolder


def backbone_config(config: CCFConfig, name: str | None = None) -> CFConfig:
    """How a run trains its backbone `name` (default `config.cf_model`): its preset, the run's seed and
    history length, on CPU."""
    history = max(config.max_history, 1)
    return cf_config(name or config.cf_model, seed=config.seed, device="cpu", max_history=history)


def train_backbone(
    config: CCFConfig, dataset: CTRDataset, folder: Path, progress: bool = True, name: str | None = None
) -> CFModel:
    """Train the backbone `name` (default `config.cf_model`) as backbone_config says, and save it with its
    valid and test metrics in `folder`."""
    result = train_cf(backbone_config(config, name), dataset, progress=progress)
    metrics = {**evaluate_cf(result.model, dataset), "best_epoch": result.best_epoch}
    save_cf(result.model, dataset, folder, metrics)
    return result.model


def test_split(dataset: CTRDataset, config: CCFConfig) -> Split:
    """The test rows a run scores: all, or a seeded sample of `test_rows` for quick runs."""
    rows = sample_rows(len(dataset.test), config.test_rows, np.random.default_rng(config.seed + 2))
    return dataset.test.take(rows)


def _metrics(test: Split, scores: np.ndarray) -> dict:
    values = split_metrics(test.uid, test.label, scores)
    return {"test_auc": values["auc"], "test_uauc": values["uauc"]}


def significance_row(test: Split, model: str, scores, versus: str, versus_scores) -> dict:
    """`model` minus `versus` in test AUC and UAUC, with 95% paired bootstrap intervals (users drawn
    with replacement, 1,000 times, seed 0): what one seed on these rows can say about the gap."""
    differences = paired_bootstrap(test.label, test.uid, scores, versus_scores)
    return {"model": model, "versus": versus, **{name: vars(d) for name, d in differences.items()}}


def _save_run(
    *, recommender, dataset, folder, cf_references, table, stages, resumed, test, scores, significance
) -> None:
    save_weights(recommender, folder)
    write_run_record(
        folder,
        CCF_LLM,
        recommender.config,
        dataset,
        llm=recommender.llm.fingerprint,
        cf_checkpoint=cf_references[0] if cf_references else "",
        cf_checkpoint2=cf_references[1] if len(cf_references) > 1 else "",
    )
    metrics = {
        "table": table,
        "stages": [vars(s) for s in stages],
        "resumed_stages": resumed,
        "significance": significance,
    }
    write_metrics(folder, metrics)
    frame = pd.DataFrame({"uid": test.uid, "iid": test.iid, "label": test.label, "score": scores})
    frame.to_parquet(folder / "predictions.parquet", index=False)
