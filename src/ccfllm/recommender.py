"""A built LLM recommender (CCF-LLM or a baseline): the LLM with LoRA, the method's CF features and
fresh ALG + GATE, with the prompts it reads; its trained weights saved in a run folder and loaded
back (load_run refuses a missing part, another LLM, another backbone or another dataset).

What a run folder holds is in experiment.py; its record's format in run_folder.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import save_file

from . import schedule
from .cf.base import CFModel
from .cf.checkpoint import load_cf
from .config import CCFConfig, replace_checked
from .data.dataset import CTRDataset, refuse_other_dataset
from .device import seed_everything
from .distributed import SINGLE, World
from .engine import score_rows
from .errors import CCFLLMError, CheckpointError
from .io import read_safetensors
from .llm import LoadedLLM, add_lora, load_llm, lora_target_modules
from .methods import LOSSES, METHODS, uses_backbone
from .methods.ccf_llm import CCFLLM
from .metrics import split_metrics
from .prompt import PromptBuilder
from .run_folder import CCF_LLM, FORMAT, read_run_record, require_file
from .schedule import Stage, reads_text_prompt


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
        return self.text_prompts if reads_text_prompt(self.config, stage) else self.hybrid_prompts

    def final_prompts(self) -> PromptBuilder:
        """What the finished model reads: its last stage's prompt; the method's own one zero-shot."""
        stages = schedule.stages(self.config.strategy)
        return self.prompts_for(stages[-1]) if stages else self.hybrid_prompts


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
    llm = load_llm(**llm_arguments(config))
    if _without_name(llm.fingerprint) != _without_name(
        record["llm"]
    ):  # the same model by another path is fine
        raise CheckpointError(
            f"{folder} was trained with the LLM {record['llm']}, but {config.llm} loads as {llm.fingerprint}."
        )
    recommender = build_recommender(config, dataset, backbone, llm, second)
    load_weights(recommender, folder)
    recommender.model.eval()
    return recommender


def read_run_config(folder: str | Path) -> dict:
    """config.json of a saved CCF-LLM (or baseline) run, of this format or the one before it."""
    return read_run_record(Path(folder), CCF_LLM)


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


def llm_arguments(config: CCFConfig, world: World = SINGLE) -> dict:
    return {
        "name": config.llm,
        "device": world.device(config.device),
        "dtype": config.dtype,
        "allow_download": config.allow_download,
    }


def _fusion_prefixes(config: CCFConfig) -> tuple[str, ...]:
    """The weights a run saves beside its adapter: what the non-LoRA stages can train."""
    source = METHODS[config.method].cf_source
    if source.features is None:
        return ()
    second = ("alignment2.", "gate2.") if config.cf_model2 else ()
    if config.cf_model2 and config.tune_cf:
        second += ("second_cf.backbone.",)
    return ("alignment.", "gate.", *source.trained(config), *second)


def save_weights(recommender: Recommender, folder: Path) -> None:
    """The trained parts: the LoRA adapter (PEFT's format) and what the other stages train."""
    model, config = recommender.model, recommender.config
    model.llm.save_pretrained(folder / "adapter")
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(_fusion_prefixes(config))
    }
    save_file(state, folder / "fusion.safetensors", metadata={"format": FORMAT})


def load_adapter(recommender: Recommender, folder: Path) -> None:
    """The LoRA adapter a run or a finished stage saved in `folder`/adapter."""
    adapter = require_file(folder / "adapter" / "adapter_model.safetensors")
    device = str(recommender.llm.model.device)
    set_peft_model_state_dict(recommender.model.llm, read_safetensors(adapter, device=device))


def load_weights(recommender: Recommender, folder: Path) -> None:
    """Load what save_weights wrote; refuse a missing part or weights of another shape of model."""
    load_adapter(recommender, folder)
    device = str(recommender.llm.model.device)
    fusion = read_safetensors(require_file(folder / "fusion.safetensors"), device=device)
    _, unexpected = recommender.model.load_state_dict(fusion, strict=False)
    prefixes = _fusion_prefixes(recommender.config)
    missing = sorted({k for k in recommender.model.state_dict() if k.startswith(prefixes)} - set(fusion))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}/fusion.safetensors does not fit this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}."
        )


def _without_name(fingerprint: dict) -> dict:
    return {key: value for key, value in fingerprint.items() if key != "name"}


def _resolve_cf(folder: Path, reference: str) -> Path:
    path = Path(reference) if Path(reference).is_absolute() else folder / reference
    if not path.is_dir():
        raise CheckpointError(
            f"The CF checkpoint of {folder} is missing: {path}. Restore it or retrain the run."
        )
    return path
