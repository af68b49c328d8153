"""Seconds per A-LLMRec stage-2 step (the next-title loss, backward, Adam on F_U and F_I) through the
decoder's own layers and through compiled ones (`compile_training`), on the same training rows and
candidates, each path in a fresh process; the LLM is the embedded one, SASRec and stage 1 untrained
(their values do not change the work).

    .venv/bin/python benchmarks/allmrec_step_time.py [--steps 12] [--batch 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch

WARM_UP = 3  # steps left out of the mean: compiling, allocator warm-up


def steps(compiled: bool, n_steps: int, batch: int) -> list[tuple[float, float]]:
    """(seconds, loss) of each step."""
    from ccfllm.cf.sasrec import SASRec
    from ccfllm.cli import CF_HISTORY
    from ccfllm.config import cf_config
    from ccfllm.data import load_collm_split, resolve_data_dir
    from ccfllm.data.next_item import draw_candidates, next_item_task, titled_items, training_positions
    from ccfllm.device import keep_freed_memory, seed_everything
    from ccfllm.llm import load_llm
    from ccfllm.methods.allmrec import ALLMRec, CollaborativeTextAlignment, next_title_loss
    from ccfllm.next_item_config import allmrec_config
    from ccfllm.next_item_prompt import NextItemPrompts

    keep_freed_memory()
    seed_everything(0)
    config = allmrec_config("cpu")
    dataset = load_collm_split(resolve_data_dir(None), max_history=CF_HISTORY)
    task = next_item_task(
        dataset, config.n_candidates, config.seed, config.sasrec_history, config.cold_user_share
    )
    sasrec_config = cf_config("sasrec", dim=config.sasrec_dim, max_history=config.sasrec_history)
    sasrec = SASRec(sasrec_config, int(max(task.sequences)) + 1, task.n_items)
    llm = load_llm(config.llm)
    encoder_dim = 384  # all-MiniLM-L6-v2's, the default encoder
    alignment = CollaborativeTextAlignment(config.sasrec_dim, encoder_dim, config.latent_dim, config.hidden)
    model = ALLMRec(llm.model, sasrec, alignment, config.hidden)
    prompts = NextItemPrompts(llm.tokenizer, task.item_titles, "movie", config.prompt_history)
    train, rng = training_positions(task, 1), np.random.default_rng(0)
    titled = titled_items(task.item_titles)
    projections = [*model.user_projection.parameters(), *model.item_projection.parameters()]
    optimiser = torch.optim.Adam(projections, lr=1e-3)
    model.train()
    result = []
    for step in range(n_steps):
        rows = np.arange(step * batch, (step + 1) * batch)
        candidates = draw_candidates(
            task, titled, train.uid[rows], train.target[rows], config.n_candidates, rng
        )
        started = time.perf_counter()
        loss = next_title_loss(model, prompts, train.history[rows], candidates, train.target[rows], compiled)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        result.append((time.perf_counter() - started, loss.item()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--path", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARM_UP:
        parser.error(f"--steps must be more than {WARM_UP} (the warm-up steps are not counted).")
    if args.path:  # the child process: one path, its steps as "seconds loss" lines
        for seconds, loss in steps(args.path == "compiled", args.steps, args.batch):
            print(f"{seconds:.4f} {loss:.6f}")
        return
    measured = {}
    for path in ("eager", "compiled"):
        command = [sys.executable, __file__, "--path", path, "--steps", str(args.steps)]
        output = subprocess.run(
            [*command, "--batch", str(args.batch)], capture_output=True, text=True, check=True
        )
        measured[path] = np.array([line.split() for line in output.stdout.split("\n") if line], float)
    print(f"A-LLMRec stage-2 steps of {args.batch} rows, mean over steps {WARM_UP + 1}-{args.steps}")
    print("| path | s per step | first step (s) | losses of the first 3 steps |\n|---|---|---|---|")
    for path, table in measured.items():
        losses = " ".join(f"{loss:.4f}" for loss in table[:3, 1])
        print(f"| {path} | {table[WARM_UP:, 0].mean():.2f} | {table[0, 0]:.1f} | {losses} |")
    speedup = measured["eager"][WARM_UP:, 0].mean() / measured["compiled"][WARM_UP:, 0].mean()
    print(f"compiled speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
