"""A-LLMRec's stage 2 with other settings, against SASRec on the same test rows: trains SASRec and
stage 1 as `ccfllm allmrec train` does, then stage 2 alone (no zero-shot, SBERT or TALLRec model),
and prints Hit@1 / Hit@5 / NDCG@10 of SASRec and A-LLMRec, stage 2's loss and the time of each part.

    .venv/bin/python benchmarks/allmrec_stage2.py --set stage2_positions=5

Settings are AllmrecConfig's (`ccfllm allmrec train --help`) over the `cpu` preset.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ccfllm.cf.next_item import next_item_metrics, rank_candidates
from ccfllm.cli import CF_HISTORY
from ccfllm.config import allmrec_config, parse_overrides
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.data.next_item import next_item_task, training_positions
from ccfllm.device import keep_freed_memory, resolve_device
from ccfllm.errors import CCFLLMError
from ccfllm.methods.allmrec import ALLMRec, NextItemPrompts, train_stage2
from ccfllm.next_item_experiment import (
    NOUNS,
    llm_ranks,
    load_task_llm,
    sample_split,
    stage2_settings,
    train_sasrec_and_alignment,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE")
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

    llm = load_task_llm(config)
    prompts = NextItemPrompts(
        llm.tokenizer, task.item_titles, NOUNS.get(dataset.domain, "item"), config.prompt_history
    )
    model = ALLMRec(llm.model, sasrec, stage1.alignment, config.hidden).to(device)
    rows = len(training_positions(task, config.stage2_positions))
    clock = time.perf_counter()
    losses = train_stage2(model, prompts, task, **stage2_settings(config))
    timings["stage2_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ranks = {
        "SASRec": rank_candidates(sasrec, test),
        "A-LLMRec": llm_ranks(model, prompts, test, config, progress=True),
    }
    timings["inference_s"] = time.perf_counter() - clock

    print(f"\nA-LLMRec stage 2 on {task.name}, cpu preset with {changed or 'nothing'} changed")
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
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
