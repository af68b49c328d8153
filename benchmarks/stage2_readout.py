"""How much of its CF backbone a saved CCF-LLM run reads back: its test scores against the backbone's
biases, which carry nearly all of what MF learns on ML-1M (see the README's CF backbones).

Prints the run's test AUC, and beside the backbone's on the rows of users in and not in train; the
AUC of the backbone's b_u + b_i and of w·b_u + b_i over a grid of w (the
best any additive reading of the two biases with those weights can do); and a least-squares fit of the
run's logit log(s / (1 - s)) on (b_u, b_i, 1): the weights it gives each bias, the share of the logit's
variance they explain, the AUC of the fitted part and of what is left, and how much of what is left
is a per-user or a per-item offset.

With --without-cf it also scores the test split again with every user's and item's CF features
withheld (x^CF = 0, the cold-start policy applied to every row; a few minutes), and splits the run's
logit into that part, what the LLM makes of the text alone, and the rest, what the CF features add.

    .venv/bin/python benchmarks/stage2_readout.py --run runs/ccf-llm/mf-cpu-seed0
    .venv/bin/python benchmarks/stage2_readout.py --run runs/ccf-llm/mf-cpu-seed0 --without-cf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.engine import score_rows
from ccfllm.errors import CCFLLMError
from ccfllm.metrics import auc, logit
from ccfllm.recommender import load_run, read_run_config

WEIGHTS = (0.3, 0.5, 0.6, 0.7, 0.8, 1.0, 1.3, 1.6, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a saved CCF-LLM run (predictions.parquet)")
    parser.add_argument(
        "--without-cf", action="store_true", help="also score the test split with the CF features withheld"
    )
    parser.add_argument("--data", default=None, help="the run's dataset folder, if not the default")
    args = parser.parse_args()
    try:
        settings = read_run_config(args.run)
    except CCFLLMError as exc:
        parser.error(str(exc))
    if not (args.run / "predictions.parquet").is_file():
        parser.error(
            f"{args.run} has no predictions.parquet (training writes it): restore it or retrain the run."
        )
    cf_folder = args.run / settings.get("cf_checkpoint", "")
    if not settings.get("cf_checkpoint") or not (cf_folder / "embeddings.safetensors").is_file():
        parser.error(f"{args.run} names no CF backbone with exported embeddings (a text-only method?).")
    biases = load_file(str(cf_folder / "embeddings.safetensors"))
    rows = pd.read_parquet(args.run / "predictions.parquet")
    label = rows["label"].to_numpy()
    user_bias = biases["user_bias"][rows["uid"].to_numpy()]
    item_bias = biases["item_bias"][rows["iid"].to_numpy()]
    score = rows["score"].to_numpy()
    logit = logit_of(score)

    print(f"run {args.run}: {len(rows)} test rows, CF backbone {cf_folder}")
    print(f"  run's test AUC                    {auc(label, score):.4f}")
    backbone = (
        user_bias
        + item_bias
        + (biases["user"][rows["uid"].to_numpy()] * biases["item"][rows["iid"].to_numpy()]).sum(1)
    )
    in_train = biases["user_in_train"][rows["uid"].to_numpy()].astype(bool)
    for name, group in (("users in train", in_train), ("users not in train", ~in_train)):
        if len(np.unique(label[group])) < 2:
            print(f"  {name + ':':33s} {group.sum()} rows, both labels needed for an AUC")
            continue
        print(
            f"  {name + ':':33s} {group.sum()} rows, run {auc(label[group], score[group]):.4f}, "
            f"backbone {auc(label[group], backbone[group]):.4f}"
        )
    print(f"  backbone's b_u + b_i              {auc(label, user_bias + item_bias):.4f}")
    by_weight = {w: auc(label, w * user_bias + item_bias) for w in WEIGHTS}
    print("  w * b_u + b_i, by w               " + ", ".join(f"{w}: {a:.4f}" for w, a in by_weight.items()))
    best = max(by_weight, key=by_weight.get)
    print(f"  best of those                     {by_weight[best]:.4f} (w = {best})")

    design = np.stack([user_bias, item_bias, np.ones_like(user_bias)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, logit, rcond=None)
    fitted = design @ coefficients
    left = logit - fitted
    print(
        f"  run's logit ~ {coefficients[0]:.3f} b_u + {coefficients[1]:.3f} b_i + {coefficients[2]:.3f}: "
        f"user/item weight {coefficients[0] / coefficients[1]:.2f}, R^2 {1 - left.var() / logit.var():.3f}"
    )
    print(f"  AUC of the fitted part {auc(label, fitted):.4f}, of what is left {auc(label, left):.4f}")
    for key, name in (("uid", "user"), ("iid", "item")):
        means = pd.Series(left).groupby(rows[key].to_numpy()).transform("mean")
        per = len(rows) / rows[key].nunique()
        print(
            f"  share of what is left carried by its means per {name}: {means.var() / left.var():.3f} "
            f"({per:.1f} rows per {name}; about {1 / per:.2f} by chance)"
        )
    if args.without_cf:
        try:
            text_part = logit_of(scores_without_cf(args.run, args.data, settings, rows))
        except CCFLLMError as exc:
            parser.error(str(exc))
        print_split_by_cf(label, logit, text_part)


def logit_of(score: np.ndarray) -> np.ndarray:
    """A run's logit from its scores, which can round to exactly 0 or 1."""
    return logit(score.clip(1e-7, 1 - 1e-7))


def scores_without_cf(run: Path, data: str | None, settings: dict, rows: pd.DataFrame) -> np.ndarray:
    """The run's test scores with every user's and item's x^CF set to zero (all of them 'unknown')."""
    dataset = load_collm_split(resolve_data_dir(data), max_history=settings["config"]["max_history"])
    test = dataset.test
    if len(rows) != len(test):
        raise CCFLLMError(
            f"{run} scored {len(rows)} of the {len(test)} test rows (test_rows); --without-cf needs a run "
            "that scored all of them."
        )
    if not (np.array_equal(test.uid, rows["uid"]) and np.array_equal(test.iid, rows["iid"])):
        raise CCFLLMError(
            f"{run}'s predictions are not the test split of {dataset.source}, row for row: "
            "name the run's dataset with --data."
        )
    recommender = load_run(run, dataset)
    model = recommender.model
    for features in (model.cf, model.second_cf):
        if features is not None:
            features.known_users.zero_()
            features.known_items.zero_()
    return score_rows(model, recommender.hybrid_prompts, test, None, recommender.config.eval_batch_size, True)


def print_split_by_cf(label: np.ndarray, logit: np.ndarray, text_part: np.ndarray) -> None:
    cf_part = logit - text_part
    print("  the run's logit = text part (CF withheld) + CF part (the rest):")
    for name, part in (("whole logit", logit), ("text part", text_part), ("CF part", cf_part)):
        print(f"    {name:12s} std {part.std():.3f}, AUC {auc(label, part):.4f}")
    print(f"    correlation of the two parts {np.corrcoef(text_part, cf_part)[0, 1]:+.3f}")
    print(
        "    CF part + w * text part, by w  "
        + ", ".join(f"{w}: {auc(label, cf_part + w * text_part):.4f}" for w in (0.0, 0.5, 1.0, 2.0))
    )


if __name__ == "__main__":
    main()
