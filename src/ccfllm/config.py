"""Typed configs with presets as data; an unknown or mistyped override key is an error, never ignored."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import CCFLLMError

ConfigT = TypeVar("ConfigT")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class CFConfig:
    """How a collaborative-filtering backbone is built and trained as a CTR model."""

    model: str = _help("backbone: mf, lightgcn or sasrec", "mf")
    dim: int = _help("embedding dimension l of the user/item tables (paper: 128)", 128)
    lr: float = _help("Adam learning rate (paper: 1e-3 or 1e-2)", 1e-3)
    weight_decay: float = _help("L2 penalty on the embeddings of each batch's users and items", 1e-4)
    bias_decay: float = _help("L2 penalty on the user and item biases of each batch", 1e-4)
    batch_size: int = _help("rows per step (paper: 1024)", 1024)
    max_epochs: int = _help("upper bound on epochs; early stopping usually ends sooner", 200)
    patience: int = _help("epochs without a better valid AUC before stopping", 5)
    n_layers: int = _help("LightGCN: graph propagation layers", 2)
    n_blocks: int = _help("SASRec: self-attention blocks", 2)
    n_heads: int = _help("SASRec: attention heads per block", 2)
    dropout: float = _help("SASRec: dropout on embeddings and attention", 0.2)
    max_history: int = _help("most recent liked items kept per row (CoLLM: 10)", 10)
    seed: int = _help("seed for initialisation and data order", 0)
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'", "auto")

    def __post_init__(self) -> None:
        positive = {"dim": self.dim, "batch_size": self.batch_size, "max_epochs": self.max_epochs}
        for name, value in positive.items():
            if value <= 0:
                raise CCFLLMError(f"CFConfig.{name} must be positive, got {value}.")
        if self.patience < 1:
            raise CCFLLMError(f"CFConfig.patience must be at least 1, got {self.patience}.")
        if self.lr <= 0 or self.weight_decay < 0 or self.bias_decay < 0:
            raise CCFLLMError("CFConfig.lr must be positive and weight_decay, bias_decay non-negative.")
        if not 0.0 <= self.dropout < 1.0:
            raise CCFLLMError(f"CFConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.model == "sasrec" and self.dim % self.n_heads:
            raise CCFLLMError(f"SASRec needs dim ({self.dim}) divisible by n_heads ({self.n_heads}).")


# Per-backbone settings, chosen by valid AUC on the ML-1M split (benchmarks/cf_backbones.py measures
# them). Strong L2 on the embeddings, light L2 on the biases: on this temporal split the biases carry
# most of what can be learnt, and loosely held embeddings overfit the training months.
CF_PRESETS: dict[str, dict[str, Any]] = {
    "mf": {"model": "mf", "lr": 3e-3, "weight_decay": 0.3, "bias_decay": 0.03, "batch_size": 256},
    "lightgcn": {"model": "lightgcn", "lr": 3e-3, "weight_decay": 0.3, "bias_decay": 0.03, "batch_size": 256},
    "sasrec": {"model": "sasrec", "lr": 3e-3, "weight_decay": 0.1, "bias_decay": 0.03},
}


def cf_config(model: str, **overrides: Any) -> CFConfig:
    """The preset of a backbone with overrides applied (unknown keys refused)."""
    if model not in CF_PRESETS:
        raise CCFLLMError(f"Unknown CF backbone {model!r}; choose one of {sorted(CF_PRESETS)}.")
    return replace_checked(CFConfig(), {**CF_PRESETS[model], **overrides})


STRATEGIES = ("two-stage", "stage1-only", "end-to-end", "zero-shot")  # Table 4; zero-shot: Table 2
STAGE1_PROMPTS = ("text", "hybrid")
CF_FEATURES = ("embedding", "embedding+bias")
FUSIONS = ("gate", "alpha-one", "alpha-scalar")  # Eq. 3-4, and the two ablations of Figure 3a
LORA_LAYERS = ("attention", "all-linear")  # llm.lora_target_modules
LR_SCHEDULES = ("constant", "cosine")  # transformers' scheduler names (train.learning_rate_schedule)


@dataclass
class CCFConfig:
    """How CCF-LLM is built, trained and evaluated (paper sections 3.2-3.4 and 4.1)."""

    method: str = _help(
        "'ccf-llm', or the baselines 'tallrec', 'tallrec-cf', 'collm', 'softprompt' (methods/)", "ccf-llm"
    )
    llm: str = _help("causal LM: 'smollm2-135m' (embedded), a local folder, or a hub id", "smollm2-135m")
    allow_download: bool = _help("allow `llm` to be fetched from the Hugging Face hub", False)
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'", "auto")
    dtype: str = _help("'auto' (bf16 where native), 'bfloat16', 'float16' or 'float32'", "auto")
    cf_model: str = _help("CF backbone whose embeddings are fused: mf, lightgcn or sasrec", "mf")
    cf_checkpoint: str = _help("trained backbone run folder; empty: train one with its preset", "")
    cf_model2: str = _help(
        "a second backbone fused at once, with its own ALG and GATE (Eq. 7); empty: none", ""
    )
    cf_checkpoint2: str = _help("trained run folder of the second backbone; empty: train one", "")
    cf_features: str = _help(
        "x^CF: 'embedding', or 'embedding+bias' (the backbone's biases appended)", "embedding+bias"
    )
    tune_cf: bool = _help("also update the CF backbone in the stage that trains the fusion", False)
    fusion: str = _help("'gate' (Eq. 3-4), or the ablations 'alpha-one' and 'alpha-scalar'", "gate")
    alg_hidden: int = _help("hidden width of the ALG alignment MLP (l -> hidden -> d)", 256)
    gate_hidden: int = _help("hidden width of each of GATE's two MLPs", 64)
    strategy: str = _help("'two-stage', 'stage1-only', 'end-to-end' (Table 4) or 'zero-shot'", "two-stage")
    stage1_prompt: str = _help(
        "what stage 1 reads: 'text' (CoLLM, TALLRec's prompt) or 'hybrid' (the method's own prompt)", "text"
    )
    stage1_from: str = _help(
        "a saved run whose stage 1 (LoRA adapter, valid curve, test row) this run reuses; it must have "
        "trained stage 1 with the same settings",
        "",
    )
    lora_targets: str = _help(
        "layers LoRA adapts: 'attention' (q/v on Llama, as LoRA's paper) or 'all-linear' (every linear "
        "layer of the blocks: attention and MLP)",
        "attention",
    )
    lora_r: int = _help("LoRA rank", 8)
    lora_alpha: int = _help("LoRA alpha", 16)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    loss: str = _help(
        "'eq5' (CCF-LLM), 'yes-logit' (CoLLM) or 'answer-ce' (TALLRec); sets the score too", "eq5"
    )
    loss_k: float = _help("weight k of the BPR term of Eq. 5", 2.0)
    lr_lora: float = _help("AdamW learning rate of the LoRA stage (paper: 1e-4)", 1e-4)
    lr_fusion: float = _help("AdamW learning rate of the ALG + GATE stage", 1e-4)
    lr_schedule: str = _help(
        "learning rate over each stage: 'constant', or 'cosine' (Vicuna's training script, which the "
        "paper follows: linear warm-up over the first 3% of the stage's steps, then cosine decay to 0)",
        "constant",
    )
    batch_size: int = _help("training rows per step (paper: 3)", 3)
    eval_batch_size: int = _help("rows per scoring batch", 32)
    epochs: int = _help("passes over the training rows per stage", 5)
    train_rows: int = _help("training rows sampled (with the seed) for stage 1 (LoRA); 0 = all", 0)
    fusion_rows: int = _help("training rows for the ALG + GATE and end-to-end stages; 0 = all", 0)
    valid_rows: int = _help("valid rows used for early stopping; 0 = all", 0)
    test_rows: int = _help("test rows scored (a seeded sample, for quick runs); 0 = all", 0)
    eval_every: int = _help("steps between validations; 0 = once per epoch", 0)
    patience: int = _help("validations without a better valid AUC before a stage stops", 2)
    max_tokens: int = _help("longest prompt; the oldest history items are dropped first (paper: 700)", 700)
    max_history: int = _help("most recent liked items shown in the prompt", 10)
    seed: int = _help("seed for sampling, initialisation and data order", 0)
    compile_training: bool = _help(
        "compile the LLM's layers (torch.compile) for training steps; 30-45 s once per stage", False
    )
    compile_scoring: bool = _help(
        "score with each Llama or Qwen2 layer as one compiled function (torch.compile; needs a C++ compiler)",
        False,
    )
    scoring_int8: bool = _help(
        "score with the decoder's linear weights in int8 and int8 activations (PyTorch's fbgemm kernel, "
        "CPU only): 1.4x faster scoring on an AVX2 CPU, but it moved SmolLM2's test AUC by 0.05 "
        "(docs/speed.md), so it is off in every preset",
        False,
    )

    def __post_init__(self) -> None:
        method = _methods().get_method(self.method)
        choices = {
            "strategy": STRATEGIES,
            "stage1_prompt": STAGE1_PROMPTS,
            "cf_features": CF_FEATURES,
            "fusion": FUSIONS,
            "cf_model": tuple(CF_PRESETS),
            "loss": tuple(_methods().LOSSES),
            "lora_targets": LORA_LAYERS,
            "lr_schedule": LR_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CCFLLMError(
                    f"CCFConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}."
                )
        for name in (
            "alg_hidden",
            "gate_hidden",
            "lora_r",
            "lora_alpha",
            "batch_size",
            "eval_batch_size",
            "epochs",
            "patience",
            "max_tokens",
        ):
            if getattr(self, name) <= 0:
                raise CCFLLMError(f"CCFConfig.{name} must be positive, got {getattr(self, name)}.")
        for name in ("train_rows", "fusion_rows", "valid_rows", "test_rows", "eval_every", "max_history"):
            if getattr(self, name) < 0:
                raise CCFLLMError(f"CCFConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.cf_model2 and (self.cf_model2 not in CF_PRESETS or self.cf_model2 == self.cf_model):
            raise CCFLLMError(
                f"CCFConfig.cf_model2 must be another backbone than cf_model ({self.cf_model!r}), one of "
                f"{list(CF_PRESETS)}; got {self.cf_model2!r}."
            )
        if self.cf_model2 and not method.two_backbones:
            two = [m.name for m in _methods().METHODS.values() if m.two_backbones]
            raise CCFLLMError(f"CCFConfig: two fused backbones (Eq. 7) are for the methods {two} alone.")
        if self.strategy not in method.strategies:
            why = method.strategy_note or "cannot run that strategy"
            raise CCFLLMError(
                f"CCFConfig: {self.method} {why}; its strategy is one of {list(method.strategies)}, got "
                f"{self.strategy!r}."
            )
        if self.lr_lora <= 0 or self.lr_fusion <= 0 or self.loss_k < 0 or not 0 <= self.lora_dropout < 1:
            raise CCFLLMError(
                "CCFConfig: learning rates must be positive, loss_k >= 0, lora_dropout in [0, 1)."
            )


# `cpu`: what buys the most AUC within 45 minutes on a 2-core CPU with the embedded 135M model;
# `cpu-1.5b`: the `cpu` preset with the installable Qwen2.5 1.5B model and twice stage 1's rows, sized by
# its measured stage-1 speed here (about 2 s a row on a 2-core AVX-512 bf16 CPU: 1,024 rows in about
# 40 minutes, README); its learning rates are the `cpu` preset's, not yet chosen for this model;
# `paper`: the paper's settings (section 4.1), for a GPU and a 7B model.
CCF_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "batch_size": 8,
        "eval_batch_size": 32,
        "lr_lora": 5e-4,
        "lr_fusion": 1e-3,
        "epochs": 1,
        "train_rows": 512,
        "fusion_rows": 1536,
        "valid_rows": 384,
        "eval_every": 32,
        "patience": 3,
        "max_history": 5,
        "max_tokens": 700,
        "compile_training": True,
        "compile_scoring": True,
    },
    "paper": {
        "batch_size": 3,
        "lr_lora": 1e-4,
        "lr_fusion": 1e-4,
        "lr_schedule": "cosine",  # the paper "referenced the official training script for Vicuna"
        "epochs": 5,
        "train_rows": 0,
        "fusion_rows": 0,
        "valid_rows": 0,
        "eval_every": 0,
        "max_history": 10,
        "max_tokens": 700,
    },
}


CCF_PRESETS["cpu-1.5b"] = {**CCF_PRESETS["cpu"], "llm": "qwen2.5-1.5b", "train_rows": 1024}

# `cpu-fp32`: the quick start for a CPU without native bf16 (AVX2 only: float32 matmuls at about 100
# GFLOP/s on 2 cores, against 900 for bf16 on the AVX-512 bf16 and AMX kinds). The `cpu` preset's run
# takes about 80 minutes there, mostly scoring (0.4 s a test row), so this one keeps the `cpu` preset's
# method and learning rates and does less of everything, sized by the times measured on that kind
# (docs/speed.md): an eighth of stage 1's rows (at chance with this LLM on any number of rows tried) and
# a quarter of stage 2's, one validation at the start and the end of each stage on fewer rows, and a
# seeded sample of the test split, whose AUC the train command prints with its 95% interval. Scoring
# runs through the decoder's own forward: in float32 the compiled layer functions were 12% slower.
CCF_PRESETS["cpu-fp32"] = {
    **CCF_PRESETS["cpu"],
    "train_rows": 64,
    "fusion_rows": 384,
    "valid_rows": 96,
    "eval_every": 0,
    "test_rows": 320,
    "compile_scoring": False,
}


CCF_PRESETS["cpu-bf16"] = CCF_PRESETS["cpu"]  # asked for by name: the `cpu` preset on any CPU

# what the quick start took, measured with `/usr/bin/time -v ccfllm train` (README, "Quick start")
PRESET_MINUTES = {
    "cpu": "13.7 minutes on a 2-core Intel Xeon with AMX (bf16), the full test split",
    "cpu-bf16": "13.7 minutes on a 2-core Intel Xeon with AMX (bf16), an estimated 80 on a 2-core AVX2 CPU",
    "cpu-fp32": "11.3 minutes on a 2-core AMD EPYC with AVX2 only (float32), 320 sampled test rows",
}


def preset_for_this_machine(preset: str, device: str = "auto", dtype: str = "auto") -> str:
    """What the command line's `cpu` preset means here: `cpu-fp32` on a CPU that computes in float32
    (no native bf16, the device and dtype left to choose or set to the CPU and float32), `cpu`
    elsewhere; any other preset as it is."""
    from .device import cpu_has_bf16, resolve_device

    if preset != "cpu" or resolve_device(device).type != "cpu" or dtype not in ("auto", "float32"):
        return preset
    return "cpu" if cpu_has_bf16() and dtype == "auto" else "cpu-fp32"


def ccf_config(preset: str = "cpu", **overrides: Any) -> CCFConfig:
    """A preset, then the settings of the method named in `overrides` (default CCF-LLM), then the
    overrides themselves (unknown keys refused)."""
    if preset not in CCF_PRESETS:
        raise CCFLLMError(f"Unknown preset {preset!r}; choose one of {sorted(CCF_PRESETS)}.")
    method = _methods().get_method(overrides.get("method", "ccf-llm"))
    return replace_checked(CCFConfig(), {**CCF_PRESETS[preset], **method.defaults, **overrides})


def _methods():
    """The method registry (methods/__init__.py), imported when first needed: the method modules
    import this one."""
    from . import methods

    return methods


def replace_checked(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """dataclasses.replace that refuses unknown keys (suggesting the closest) and coerces strings to type."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    clean = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CCFLLMError(
                f"Unknown setting '{key}' for {type(config).__name__}.{hint} Known: {sorted(fields)}."
            )
        clean[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(config, **clean)


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """'key=value' strings from the command line into a dict (values coerced later, per field)."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CCFLLMError(f"Setting {pair!r} is not of the form key=value.")
        result[key.strip().replace("-", "_")] = value.strip()
    return result


_KIND_IN_WORDS = {int: "a whole number", float: "a number", bool: "true or false"}


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        return kind(value)
    except ValueError as exc:
        expected = _KIND_IN_WORDS.get(kind, f"a {kind.__name__}")
        raise CCFLLMError(f"Setting '{key}' needs {expected}, got {value!r}.") from exc


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
