"""CCF-LLM from a dataset to a saved, evaluated run: the CF backbone, the LLM with LoRA, the stages
that the strategy names, test scores after each, and a run folder that reloads to the same scores.

A run folder holds
  cf/                     the CF backbone (when the run trained it; otherwise config.json names it)
  adapter/                the LoRA adapter, in PEFT's format (adapter_model.safetensors)
  fusion.safetensors      ALG and GATE (and the backbone's weights, if it was tuned)
  config.json             the CCFConfig, the LLM's fingerprint, the CF checkpoint, the dataset
  metrics.json            valid/test AUC and UAUC after each stage, the training curves, timings
  predictions.parquet     uid, iid, label, score on the test split, from the final model

Until it is done, a run works in OUT.partial beside OUT, which keeps what it has finished: the backbone
it trained (cf/), and each stage's weights, result, test scores and random-number state
(stages/N-STAGE/); and, while a stage trains, its state at its last validation
(stages/N-STAGE.progress.safetensors). An interrupted run leaves that folder; `resume=True`
(`ccfllm train --resume`) continues it with the same settings, from the last validation of the stage
it stopped in, and ends where an uninterrupted run would, to the digit.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cf.base import CFModel
from .cf.checkpoint import load_cf, save_cf
from .cf.reference import reference_scores
from .cf.train import evaluate_cf, predict_split, train_cf
from .config import CCFConfig, CFConfig, cf_config, replace_checked, to_dict
from .data.dataset import PAD, CTRDataset, Split, pad_histories, refuse_other_dataset
from .device import seed_everything
from .distributed import SINGLE, World, check_global_batch, current_world
from .engine import score_rows
from .errors import CCFLLMError, CheckpointError
from .io import atomic_path, read_safetensors
from .llm import LoadedLLM, add_lora, load_llm, lora_target_modules
from .methods import LOSSES, METHODS, uses_backbone
from .methods.ccf_llm import CCFLLM
from .metrics import paired_bootstrap, split_metrics
from .partial import (
    drop_if_nothing_finished,
    open_partial_folder,
    progress_file,
    random_state,
    restore_random_state,
)
from .prompt import PromptBuilder
from .train import Stage, StageResult, sample_rows, train_stage

RUN_FORMAT = "ccfllm-run/1"


@dataclass
class Recommender:
    """A built LLM recommender (CCF-LLM or a baseline) with the two prompt builders it reads."""

    model: CCFLLM
    text_prompts: PromptBuilder  # TALLRec-style, no CF positions
    hybrid_prompts: PromptBuilder  # the method's prompt with CF positions (section 3.2 for CCF-LLM)
    config: CCFConfig
    llm: LoadedLLM

    def prompts_for(self, stage: Stage) -> PromptBuilder:
        """What a stage reads: stage 1 the prompt `stage1_prompt` names, the others the hybrid prompt."""
        text_first = stage == Stage.LORA and self.config.stage1_prompt == "text"
        return self.text_prompts if text_first else self.hybrid_prompts

    def final_prompts(self) -> PromptBuilder:
        """What the finished model reads: its last stage's prompt; the method's own one zero-shot."""
        stages = _stages(self.config.strategy)
        return self.prompts_for(stages[-1]) if stages else self.hybrid_prompts


@dataclass
class RunResult:
    folder: Path
    table: list[dict]  # one row per model: name, test AUC, test UAUC, valid AUC
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0
    significance: list[dict] = field(default_factory=list)  # the final model against each backbone


def build_recommender(
    config: CCFConfig,
    dataset: CTRDataset,
    backbone: CFModel | None,
    llm: LoadedLLM,
    second_backbone: CFModel | None = None,
) -> Recommender:
    """Wrap the LLM with LoRA, attach the method's CF features (the frozen backbone's, free tables or
    none; and a second backbone's for Eq. 7) and fresh ALG + GATE."""
    seed_everything(config.seed)
    method = METHODS[config.method]
    device = llm.model.device
    features = cf_features(config, dataset, backbone)
    second = cf_features(config, dataset, second_backbone) if config.cf_model2 else None
    targets = lora_target_modules(llm.model, config.lora_targets)
    peft_model = add_lora(llm.model, config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    score = LOSSES[config.loss].score
    model = CCFLLM(peft_model, features, config, llm.yes_id, llm.no_id, score, second).to(device)
    ranking = method.cf_source.ranking
    similar = ranking(backbone, dataset) if ranking else None
    builders = [
        make_prompts(llm, dataset.item_titles, dataset.domain, config, prompt, similar)
        for prompt in ("text", method.prompt)
    ]
    return Recommender(model, *builders, config=config, llm=llm)


def cf_features(config: CCFConfig, dataset: CTRDataset, backbone: CFModel | None) -> torch.nn.Module | None:
    """x^CF for the method, as its CF source builds it: a frozen backbone's, free trainable tables
    (Softprompt) or none (TALLRec). Users and items absent from the training rows are marked unknown:
    they get zero vectors."""
    source = METHODS[config.method].cf_source
    if source.features is None:
        return None
    known_users = torch.zeros(dataset.n_users, dtype=torch.bool)
    known_users[np.unique(dataset.train.uid)] = True
    known_items = torch.zeros(dataset.n_items, dtype=torch.bool)
    known_items[np.unique(dataset.train.iid)] = True
    if config.tune_cf and not source.tunable:
        raise CCFLLMError(f"tune_cf needs a CF backbone to tune; method {config.method!r} has none.")
    return source.features(config, backbone, known_users, known_items)


def make_prompts(
    llm: LoadedLLM,
    titles: np.ndarray,
    domain: str,
    config: CCFConfig,
    prompt: str,
    similar: dict[int, list[int]] | None = None,
) -> PromptBuilder:
    """The builder of a prompt layout (prompt.LAYOUTS); 'cf-text' (Table 2) lists each user's `similar`
    items."""
    return PromptBuilder(
        llm.tokenizer,
        titles,
        domain,
        max_tokens=config.max_tokens,
        layout=prompt,
        max_history=config.max_history,
        similar_items=similar if prompt == "cf-text" else None,
    )


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
    llm = load_llm(**_llm_arguments(config, world))  # before the backbone: a bad --llm fails at once
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
    for number, stage in enumerate(_stages(config.strategy), 1):
        prompts = recommender.prompts_for(stage)
        last = number == len(_stages(config.strategy))
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
    state = {
        "test_scores": torch.as_tensor(np.asarray(scores)).contiguous(),
        **random_state(recommender.llm.model.device, world),
    }
    if not world.is_main:
        return
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        _save_weights(recommender, tmp)
        save_file(state, tmp / "state.safetensors")
        (tmp / "stage.json").write_text(json.dumps({"result": vars(result), "row": row}, indent=2) + "\n")


def _load_stage(
    recommender: Recommender, folder: Path, world: World = SINGLE
) -> tuple[StageResult, dict, np.ndarray]:
    _load_weights(recommender, folder)
    state = read_safetensors(_require(folder / "state.safetensors"))
    restore_random_state(state, recommender.llm.model.device, world)
    record = json.loads(_require(folder / "stage.json").read_text())
    return StageResult(**record["result"]), record["row"], state["test_scores"].numpy()


# Settings that decide what stage 1 learns, when it reads the text-only prompt: two runs that agree on
# them train the same LoRA adapter, so one can reuse the other's (the runner shares it among variants).
STAGE1_SETTINGS = (
    "llm", "dtype", "loss", "loss_k", "lr_lora", "lr_schedule", "batch_size", "epochs", "train_rows",
    "valid_rows", "eval_every", "patience", "max_tokens", "max_history", "lora_targets", "lora_r",
    "lora_alpha", "lora_dropout", "seed", "stage1_prompt", "test_rows",
)  # fmt: skip


def stage1_signature(config: CCFConfig | dict) -> dict | None:
    """What stage 1 depends on, or None where it depends on more (a hybrid stage-1 prompt reads the
    method's CF positions), does not end with the saved adapter (end-to-end) or does not exist."""
    settings = config if isinstance(config, dict) else to_dict(config)
    if settings["stage1_prompt"] != "text" or settings["strategy"] in ("end-to-end", "zero-shot"):
        return None
    defaults = to_dict(CCFConfig())  # a run saved before a setting existed ran with its default
    return {key: settings.get(key, defaults[key]) for key in STAGE1_SETTINGS}


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
    _load_adapter(recommender, donor)
    stages = json.loads(_require(donor / "metrics.json").read_text())["stages"]
    return StageResult(**{**stages[0], "seconds": 0.0})


def _donor_stage1_row(donor: Path) -> dict:
    table = json.loads((donor / "metrics.json").read_text())["table"]
    row = next(r for r in table if r["model"].endswith("after stage lora"))
    return {"test_auc": row["test_auc"], "test_uauc": row["test_uauc"], "reused_from": str(donor)}


def load_run(
    folder: str | Path, dataset: CTRDataset, device: str = "auto", dtype: str | None = None
) -> Recommender:
    """Rebuild a saved run; refuse a missing part, another LLM, another backbone or another dataset.
    `dtype` overrides the dtype the run was trained in (the speed benchmark's float32 oracle uses it)."""
    folder = Path(folder)
    record = read_run_config(folder)
    config = replace_checked(
        CCFConfig(), {**record["config"], "device": device, "dtype": dtype or record["config"]["dtype"]}
    )
    refuse_other_dataset(folder, record["dataset"], dataset)
    backbone = second = None
    if uses_backbone(METHODS[config.method]):
        cf_folder = _resolve_cf(folder, record["cf_checkpoint"])
        backbone = load_cf(cf_folder, dataset=dataset, expect_model=config.cf_model, device="cpu")
    if config.cf_model2:
        cf_folder = _resolve_cf(folder, record.get("cf_checkpoint2", ""))
        second = load_cf(cf_folder, dataset=dataset, expect_model=config.cf_model2, device="cpu")
    llm = load_llm(**_llm_arguments(config))
    if _without_name(llm.fingerprint) != _without_name(
        record["llm"]
    ):  # the same model by another path is fine
        raise CheckpointError(
            f"{folder} was trained with the LLM {record['llm']}, but {config.llm} loads as {llm.fingerprint}."
        )
    recommender = build_recommender(config, dataset, backbone, llm, second)
    _load_weights(recommender, folder)
    recommender.model.eval()
    return recommender


def evaluate_run(
    recommender: Recommender, dataset: CTRDataset, splits=("valid", "test"), progress=True
) -> dict:
    """{split: {"auc", "uauc"}} of a loaded run, scored with the prompt its final stage read."""
    prompts = recommender.final_prompts()
    results = {}
    for name in splits:
        split = dataset.splits[name]
        scores = score_rows(
            recommender.model, prompts, split, None, recommender.config.eval_batch_size, progress
        )
        results[name] = split_metrics(split.uid, split.label, scores)
    return results


def predict_rows(
    recommender: Recommender, dataset: CTRDataset, rows: pd.DataFrame, progress: bool = False
) -> pd.DataFrame:
    """Scores for arbitrary (uid, iid) rows, with the cold-start policy of the README.

    A row's history is its `history` column if given, else the user's most recent liked items in the
    dataset. A user or item that the CF backbone never saw in training has no CF embedding: its x^CF is
    a zero vector, so its positions carry no collaborative signal (the user token is ALG(0); each title
    token is fused with ALG(0), Eq. 4, which is the same for every such item), and the `cf` column says
    which side had one. A new item needs a `title` column.
    """
    frame = _checked_prediction_rows(rows, dataset)
    titles = _titles_with_new_items(dataset, frame)
    histories = _prediction_histories(dataset, frame, recommender.config.max_history)
    split = Split(
        name="predict",
        uid=frame["uid"].to_numpy(np.int64),
        iid=frame["iid"].to_numpy(np.int64),
        label=np.zeros(len(frame), dtype=np.int64),
        timestamp=np.zeros(len(frame), dtype=np.int64),
        history=histories,
        warm=np.zeros(len(frame), dtype=bool),
    )
    prompts = recommender.final_prompts()
    if len(titles) != len(dataset.item_titles):
        prompts = make_prompts(
            recommender.llm, titles, dataset.domain, recommender.config, prompts.layout, prompts.similar_items
        )
    batch_size = recommender.config.eval_batch_size
    scores = score_rows(recommender.model, prompts, split, None, batch_size, progress)
    features = recommender.model.cf
    if features is None:  # a text-only method reads no CF signal
        return pd.DataFrame({"uid": split.uid, "iid": split.iid, "score": scores, "cf": "none"})
    known_users = features.known_users.cpu().numpy()
    known_items = features.known_items.cpu().numpy()
    user_known = np.array([0 <= u < len(known_users) and known_users[u] for u in split.uid])
    item_known = np.array([0 <= i < len(known_items) and known_items[i] for i in split.iid])
    cf = np.select(
        [user_known & item_known, user_known, item_known], ["user+item", "user only", "item only"], "none"
    )
    return pd.DataFrame({"uid": split.uid, "iid": split.iid, "score": scores, "cf": cf})


# -- pieces -----------------------------------------------------------------------------------------


def _stages(strategy: str) -> list[Stage]:
    return {
        "two-stage": [Stage.LORA, Stage.FUSION],
        "stage1-only": [Stage.LORA],
        "end-to-end": [Stage.ALL],
        "zero-shot": [],
    }[strategy]


def _llm_arguments(config: CCFConfig, world: World = SINGLE) -> dict:
    return {
        "name": config.llm,
        "device": world.device(config.device),
        "dtype": config.dtype,
        "allow_download": config.allow_download,
    }


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


def _fusion_prefixes(config: CCFConfig) -> tuple[str, ...]:
    """The weights a run saves beside its adapter: what the non-LoRA stages can train."""
    source = METHODS[config.method].cf_source
    if source.features is None:
        return ()
    second = ("alignment2.", "gate2.") if config.cf_model2 else ()
    if config.cf_model2 and config.tune_cf:
        second += ("second_cf.backbone.",)
    return ("alignment.", "gate.", *source.trained(config), *second)


def _save_weights(recommender: Recommender, folder: Path) -> None:
    """The trained parts: the LoRA adapter (PEFT's format) and what the other stages train."""
    model, config = recommender.model, recommender.config
    model.llm.save_pretrained(folder / "adapter")
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(_fusion_prefixes(config))
    }
    save_file(state, folder / "fusion.safetensors", metadata={"format": RUN_FORMAT})


def _load_adapter(recommender: Recommender, folder: Path) -> None:
    """The LoRA adapter a run or a finished stage saved in `folder`/adapter."""
    adapter = _require(folder / "adapter" / "adapter_model.safetensors")
    device = str(recommender.llm.model.device)
    set_peft_model_state_dict(recommender.model.llm, read_safetensors(adapter, device=device))


def _load_weights(recommender: Recommender, folder: Path) -> None:
    """Load what _save_weights wrote; refuse a missing part or weights of another shape of model."""
    _load_adapter(recommender, folder)
    device = str(recommender.llm.model.device)
    fusion = read_safetensors(_require(folder / "fusion.safetensors"), device=device)
    _, unexpected = recommender.model.load_state_dict(fusion, strict=False)
    prefixes = _fusion_prefixes(recommender.config)
    missing = sorted({k for k in recommender.model.state_dict() if k.startswith(prefixes)} - set(fusion))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}/fusion.safetensors does not fit this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}."
        )


def _save_run(
    *, recommender, dataset, folder, cf_references, table, stages, resumed, test, scores, significance
) -> None:
    config = recommender.config
    _save_weights(recommender, folder)
    record = {
        "format": RUN_FORMAT,
        "config": to_dict(config),
        "llm": recommender.llm.fingerprint,
        "cf_checkpoint": cf_references[0] if cf_references else "",
        "cf_checkpoint2": cf_references[1] if len(cf_references) > 1 else "",
        "dataset": dataset.fingerprint(),
    }
    (folder / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    metrics = {
        "table": table,
        "stages": [vars(s) for s in stages],
        "resumed_stages": resumed,
        "significance": significance,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    frame = pd.DataFrame({"uid": test.uid, "iid": test.iid, "label": test.label, "score": scores})
    frame.to_parquet(folder / "predictions.parquet", index=False)


def _without_name(fingerprint: dict) -> dict:
    return {key: value for key, value in fingerprint.items() if key != "name"}


def read_run_config(folder: Path) -> dict:
    path = _require(folder / "config.json")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
    if record.get("format") != RUN_FORMAT:
        raise CheckpointError(
            f"{path} is not a ccfllm run (format {record.get('format')!r}, expected {RUN_FORMAT})."
        )
    return record


def _resolve_cf(folder: Path, reference: str) -> Path:
    path = Path(reference) if Path(reference).is_absolute() else folder / reference
    if not path.is_dir():
        raise CheckpointError(
            f"The CF checkpoint of {folder} is missing: {path}. Restore it or retrain the run."
        )
    return path


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the run folder is incomplete. Retrain the run or restore the file."
        )
    return path


def _checked_prediction_rows(rows: pd.DataFrame, dataset: CTRDataset) -> pd.DataFrame:
    missing = [c for c in ("uid", "iid") if c not in rows.columns]
    if missing:
        raise CCFLLMError(f"Rows to score need columns uid and iid; missing {missing}.")
    for column in ("uid", "iid"):
        if rows[column].isna().any() or not pd.api.types.is_integer_dtype(rows[column]):
            raise CCFLLMError(f"Column {column!r} of the rows to score must hold integers without gaps.")
    new_items = rows["iid"][(rows["iid"] <= PAD) | (rows["iid"] >= dataset.n_items)]
    if len(new_items) and "title" not in rows.columns:
        raise CCFLLMError(
            f"Items {sorted(set(new_items.tolist()))[:5]} are not in {dataset.name}: add a `title` column "
            "so that they can be scored from their text."
        )
    return rows.reset_index(drop=True)


def _titles_with_new_items(dataset: CTRDataset, frame: pd.DataFrame) -> np.ndarray:
    new = frame[frame["iid"] >= dataset.n_items]
    if new.empty:
        return dataset.item_titles
    titles = np.concatenate(
        [dataset.item_titles, np.full(int(new["iid"].max()) + 1 - dataset.n_items, "", object)]
    )
    titles[new["iid"].to_numpy()] = new["title"].astype(str).to_numpy()
    return titles


def _prediction_histories(dataset: CTRDataset, frame: pd.DataFrame, max_history: int) -> np.ndarray:
    if "history" in frame.columns:
        return pad_histories([[int(i) for i in h if i != PAD] for h in frame["history"]], max_history)
    latest: dict[int, list[int]] = {}
    for split in dataset.splits.values():  # the user's most recent liked items, over all splits
        for uid, iid, label, timestamp in zip(
            split.uid, split.iid, split.label, split.timestamp, strict=True
        ):
            if label == 1:
                latest.setdefault(int(uid), []).append((int(timestamp), int(iid)))
    liked = {uid: [iid for _, iid in sorted(pairs)] for uid, pairs in latest.items()}
    return pad_histories([liked.get(int(uid), []) for uid in frame["uid"]], max_history)
