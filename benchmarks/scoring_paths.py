"""The engine's scoring paths on one machine, on the same seeded test rows of a saved run (issue #45):
float32 through the decoder's own forward (`compile_scoring` off), the compiled layer functions
(`compile_scoring` on), and int8 weights (`scoring_int8`): seconds per row, AUC, and how far int8
moves each score and the AUC from float32.

    CCFLLM_DATA=../shared/data/ml-1m-collm .venv/bin/python benchmarks/scoring_paths.py --run RUN --rows 256

Run it alone on the machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ccfllm.data import load_collm_split
from ccfllm.data.paths import resolve_data_dir
from ccfllm.device import cpu_kind, keep_freed_memory
from ccfllm.engine import score_rows
from ccfllm.metrics import auc
from ccfllm.recommender import load_run

PATHS = {  # name: (what it is, compile_scoring, scoring_int8)
    "forward": ("float32, decoder forward", False, False),
    "compiled": ("float32, compiled layer functions", True, False),
    "int8": ("int8 weights, layer functions", False, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a saved CCF-LLM run folder")
    parser.add_argument("--rows", type=int, default=256, help="seeded sample of test rows (0: all)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: " + ",".join(PATHS))
    args = parser.parse_args()
    keep_freed_memory()  # as the ccfllm command does
    dataset = load_collm_split(resolve_data_dir(None), max_history=10)
    recommender = load_run(args.run, dataset)
    model, prompts, test = recommender.model, recommender.final_prompts(), dataset.test
    rng = np.random.default_rng(12345)
    rows = np.sort(rng.choice(len(test), args.rows, replace=False)) if args.rows else np.arange(len(test))
    print(f"{cpu_kind()}; {len(rows)} test rows of {args.run}")
    scores = {}
    names = args.paths.split(",")
    if unknown := [name for name in names if name not in PATHS]:
        parser.error(f"unknown --paths {', '.join(unknown)}: choose from {','.join(PATHS)}")
    for name in names:
        what, model.compile_scoring, model.scoring_int8 = PATHS[name]
        score_rows(model, prompts, test, rows[:32], 32)  # warm-up (compiling, where it compiles), untimed
        started = time.perf_counter()
        scores[name] = score_rows(model, prompts, test, rows, 32)
        seconds = time.perf_counter() - started
        figure = auc(test.label[rows], scores[name])
        print(f"{what}: {seconds:.1f} s ({seconds / len(rows):.3f} s a row), AUC {figure:.4f}", flush=True)
    exact, int8 = scores.get("forward"), scores.get("int8")
    if exact is not None and int8 is not None:
        gap = np.abs(int8 - exact)
        moved = auc(test.label[rows], int8) - auc(test.label[rows], exact)
        said = f"largest score gap {gap.max():.4f}, mean {gap.mean():.4f}, AUC {moved:+.4f}"
        print(f"int8 against float32: {said}")


if __name__ == "__main__":
    main()
