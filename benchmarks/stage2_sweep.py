"""Stage 2 (ALG + GATE, LLM frozen) retrained from a saved run's stage-1 LoRA, with other settings:
prints the valid-AUC curve of each, to choose the preset's fusion settings without rerunning stage 1.

    .venv/bin/python benchmarks/stage2_sweep.py --run runs/ccf-llm/mf-cpu --set lr_fusion=3e-3
    .venv/bin/python benchmarks/stage2_sweep.py --run runs/ccf-llm/mf-cpu --holdout 0.2 --test

`--holdout S` trains stage 2 on the latest share S of the training rows, reading x^CF from a backbone
of the run's kind trained on the rest, so that its rows are out-of-sample for the backbone they read,
as valid and test rows are; validation and test read the run's backbone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ccfllm.cf.train import evaluate_cf, train_cf
from ccfllm.config import parse_overrides, replace_checked
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.data.dataset import without_latest_train_rows
from ccfllm.device import seed_everything
from ccfllm.engine import score_rows
from ccfllm.errors import CCFLLMError
from ccfllm.experiment import backbone_config, test_split
from ccfllm.methods.ccf_llm import Alignment, Gate
from ccfllm.metrics import auc, uauc
from ccfllm.recommender import cf_features, load_run, read_run_config
from ccfllm.train import Stage, train_stage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a saved two-stage CCF-LLM run")
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda:N'")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE for stage 2")
    parser.add_argument("--test", action="store_true", help="also score the test split after stage 2")
    parser.add_argument(
        "--base-llm", action="store_true", help="train stage 2 on the LLM without the stage-1 adapter"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="train stage 2 on this latest share of the train rows, reading x^CF from a backbone "
        "trained on the rest (validation and test read the run's backbone)",
    )
    args = parser.parse_args()
    if not 0 <= args.holdout < 1:
        parser.error(f"--holdout must be at least 0 and below 1, got {args.holdout}.")
    try:
        record = read_run_config(args.run)["config"]
        dataset = load_collm_split(resolve_data_dir(args.data), max_history=record["max_history"])
        recommender = load_run(args.run, dataset, device=args.device)
        config = replace_checked(recommender.config, parse_overrides(args.settings))
    except CCFLLMError as exc:
        parser.error(str(exc))
    model = recommender.model
    model.compile_training, model.compile_scoring = config.compile_training, config.compile_scoring
    if args.base_llm:  # LoRA's B at zero: the adapter adds nothing
        with torch.no_grad():
            for name, parameter in model.llm.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
    seed_everything(config.seed)  # fresh ALG and GATE, as the run's stage 2 started from
    llm_dim = model.llm.get_input_embeddings().embedding_dim
    device = next(model.parameters()).device
    model.alignment = Alignment(model.cf.dim, config.alg_hidden, llm_dim).to(device)
    model.gate = Gate(llm_dim, config.gate_hidden, config.fusion).to(device)
    train, holdout_features = dataset.train, None
    if args.holdout:
        train, holdout_features = holdout_backbone(dataset, config, args.holdout, device)
    started = time.perf_counter()
    result = train_stage(
        model,
        Stage.FUSION,
        recommender.hybrid_prompts,
        train,
        dataset.valid,
        config,
        train_features=holdout_features,
    )
    print(
        f"settings {args.settings}: {time.perf_counter() - started:.0f} s, "
        f"best valid AUC {result.best_valid_auc:.4f}"
    )
    for point in result.curve:
        print(
            f"  step {point['step']:4d}  valid AUC {point['valid_auc']:.4f}  train loss {point['train_loss']}"
        )
    if args.test:
        test = test_split(dataset, config)  # all rows, or the seeded sample `test_rows` asks for
        scores = score_rows(model, recommender.hybrid_prompts, test, None, config.eval_batch_size, True)
        print(
            f"test AUC {auc(test.label, scores):.4f}, UAUC {uauc(test.uid, test.label, scores):.4f} "
            f"({len(test)} rows)"
        )


def holdout_backbone(dataset, config, share: float, device):
    """The latest `share` of the train rows, and x^CF from the run's backbone kind trained on the rest."""
    earlier, late = without_latest_train_rows(dataset, share)
    backbone = train_cf(backbone_config(config), earlier).model
    print(f"holdout backbone on {len(earlier.train)} rows: {evaluate_cf(backbone, dataset)}")
    print(f"stage 2 trains on the latest {len(late)} train rows")
    return late, cf_features(config, earlier, backbone).to(device)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
