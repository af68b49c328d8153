"""What the titles carry beyond the CF backbone, and whether the frozen LLM's state already holds it.

Every CPU run's stage 1 (LoRA on TALLRec's text prompt) ends near chance, test AUC about 0.50. This
asks whether that is the text or the training. On seeded samples of the split's rows it prints the
test AUC of:
- the CF backbone's logit (MF, its preset);
- the release year that ends a MovieLens title ("Heat (1995)"), read with a regular expression;
- a linear probe on the frozen LLM: a logistic regression (L2 strength chosen on valid) on its last
  hidden state at the answer position of the text prompt stage 1 reads (the `cpu` preset's history
  length), fitted on `--train-rows` training rows;
each alone and beside MF's logit, in a two-feature logistic regression fitted on the valid rows, and
for the year also on the training rows, where MF's logit is in-sample as it is for stage 2, and on the
latest `--holdout` share of the training rows with the logit of an MF trained on the rest (so
out-of-sample there too; the test rows still read the MF trained on every training row).

    .venv/bin/python benchmarks/text_signal.py [--train-rows 4096] [--valid-rows 1024] [--test-rows 2048]
        [--holdout 0.2] [--no-probe] [--llm NAME]
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from ccfllm.cf.train import predict_split, train_cf
from ccfllm.config import ccf_config, cf_config
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.data.dataset import Split, without_latest_train_rows
from ccfllm.device import keep_freed_memory
from ccfllm.errors import CCFLLMError
from ccfllm.llm import load_llm
from ccfllm.metrics import auc, logit
from ccfllm.prompt import PromptBuilder
from ccfllm.train import sample_rows

YEAR_AT_END = re.compile(r"\((\d{4})\)\s*$")
PROBE_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)  # sklearn's C: inverse L2 strength


def cf_logits(model, split: Split) -> np.ndarray:
    """The backbone's logit of each row (its click probability, turned back)."""
    return logit(predict_split(model, split))


def release_years(titles: np.ndarray, iid: np.ndarray) -> np.ndarray:
    """Decades since 1990 of each row's item; NaN where its title ends with no year."""
    years = [YEAR_AT_END.search(str(titles[i])) for i in iid]
    return np.array([(int(y.group(1)) - 1990) / 10 if y else np.nan for y in years])


@torch.no_grad()
def answer_states(llm, builder: PromptBuilder, split: Split, batch_size: int, name: str) -> np.ndarray:
    """The decoder's final (normed) hidden state at each row's answer position, float32 (N, d)."""
    decoder, states = llm.model.get_decoder(), []
    for start in tqdm(range(0, len(split), batch_size), desc=f"probe {name}", unit="batch"):
        end = start + batch_size
        batch = builder.batch(split.uid[start:end], split.iid[start:end], split.history[start:end])
        positions = (batch.attention_mask.cumsum(1) - 1).clamp_min(0)
        out = decoder(
            input_ids=batch.input_ids.to(llm.model.device),
            attention_mask=batch.attention_mask.to(llm.model.device),
            position_ids=positions.to(llm.model.device),
        )
        states.append(out.last_hidden_state[:, -1].float().cpu().numpy())
    return np.concatenate(states)


def holdout_rows(dataset, share: float, seed: int) -> tuple[Split, np.ndarray]:
    """The latest `share` of the training rows, and the logit on them of an MF trained on the rest."""
    earlier, late = without_latest_train_rows(dataset, share)
    backbone = train_cf(cf_config("mf", seed=seed, device="cpu"), earlier, progress=False).model
    return late, cf_logits(backbone, late)


def with_cf(fit_feature, fit_cf, fit_label, test_feature, test_cf) -> np.ndarray:
    """Test scores of a logistic regression on (CF logit, feature) fitted on the `fit_` rows."""
    combiner = LogisticRegression(max_iter=1000).fit(np.stack([fit_cf, fit_feature], 1), fit_label)
    return combiner.decision_function(np.stack([test_cf, test_feature], 1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-rows", type=int, default=4096, help="training rows the probe is fitted on")
    parser.add_argument("--valid-rows", type=int, default=1024)
    parser.add_argument("--test-rows", type=int, default=2048, help="0: every test row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of the latest training rows")
    parser.add_argument("--no-probe", action="store_true", help="skip the LLM probe (a minute, not ten)")
    parser.add_argument("--llm", help="the LLM the probe reads (default: the cpu preset's)")
    args = parser.parse_args()
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout must be between 0 and 1, got {args.holdout}.")
    for name in ("train_rows", "valid_rows", "test_rows"):
        if getattr(args, name) < 0 or (name != "test_rows" and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    keep_freed_memory()
    started = time.time()
    try:
        dataset = load_collm_split(resolve_data_dir(args.data))
    except CCFLLMError as exc:
        parser.error(str(exc))
    rng = np.random.default_rng(args.seed)
    splits = {
        name: getattr(dataset, name).take(sample_rows(len(getattr(dataset, name)), rows, rng))
        for name, rows in (("train", args.train_rows), ("valid", args.valid_rows), ("test", args.test_rows))
    }
    backbone = train_cf(cf_config("mf", seed=args.seed, device="cpu"), dataset, progress=False).model
    cf = {name: cf_logits(backbone, split) for name, split in splits.items()}
    label = {name: split.label for name, split in splits.items()}
    print(
        f"{dataset.name}: {len(splits['train'])} train, {len(splits['valid'])} valid, "
        f"{len(splits['test'])} test rows sampled (seed {args.seed})"
    )
    late, late_cf = holdout_rows(dataset, args.holdout, args.seed)
    print(
        "| signal | test AUC alone | with MF's logit, fitted on valid | fitted on train | "
        f"fitted on the latest {args.holdout:.0%} of train, MF trained on the rest |\n|---|---|---|---|---|"
    )
    print(f"| MF logit | {auc(label['test'], cf['test']):.4f} | - | - | - |")

    splits["late"], cf["late"], label["late"] = late, late_cf, late.label
    year = {name: release_years(dataset.item_titles, split.iid) for name, split in splits.items()}
    if any(np.isnan(values).any() for values in year.values()):
        print("| release year | n/a: some titles end without one | - | - | - |")
    else:
        fitted = {
            fit: auc(label["test"], with_cf(year[fit], cf[fit], label[fit], year["test"], cf["test"]))
            for fit in ("valid", "train", "late")
        }
        print(
            f"| release year (older: liked more) | {auc(label['test'], -year['test']):.4f} | "
            f"{fitted['valid']:.4f} | {fitted['train']:.4f} | {fitted['late']:.4f} |"
        )
    print(
        f"MF's logit on the {len(splits['train'])} sampled train rows (in-sample): AUC "
        f"{auc(label['train'], cf['train']):.4f}; on the latest {len(late)}, "
        f"from the MF trained on the rest: {auc(label['late'], cf['late']):.4f}"
    )
    if args.no_probe:
        print(f"{time.time() - started:.0f} s in all")
        return
    del splits["late"]

    preset = ccf_config("cpu")
    llm = load_llm(args.llm or preset.llm, device=preset.device, dtype=preset.dtype)
    print(f"probe LLM: {llm.name} ({llm.model.config.model_type})")
    builder = PromptBuilder(
        llm.tokenizer,
        dataset.item_titles,
        dataset.domain,
        preset.max_tokens,
        layout="text",
        max_history=preset.max_history,
    )
    states = {
        name: answer_states(llm, builder, split, args.batch_size, name) for name, split in splits.items()
    }
    center, spread = states["train"].mean(0), states["train"].std(0) + 1e-6
    scaled = {name: (values - center) / spread for name, values in states.items()}
    probes = {
        strength: LogisticRegression(C=strength, max_iter=3000).fit(scaled["train"], label["train"])
        for strength in PROBE_STRENGTHS
    }
    valid_auc = {s: auc(label["valid"], p.decision_function(scaled["valid"])) for s, p in probes.items()}
    best = max(valid_auc, key=valid_auc.get)
    probe = {name: probes[best].decision_function(values) for name, values in scaled.items()}
    combined = with_cf(probe["valid"], cf["valid"], label["valid"], probe["test"], cf["test"])
    print(
        f"| linear probe on the frozen LLM (C={best:g}) | {auc(label['test'], probe['test']):.4f} | "
        f"{auc(label['test'], combined):.4f} | - |"
    )
    print("probe valid AUC by C: " + ", ".join(f"{s:g}: {a:.4f}" for s, a in valid_auc.items()))
    print(f"{time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()
