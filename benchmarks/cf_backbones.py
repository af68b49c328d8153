"""Train MF, LightGCN and SASRec on the ML-1M CoLLM split with several seeds and print one table:
valid/test AUC and UAUC (mean ± std over seeds) beside the paper's reproduced test AUC, the
non-learned reference (smoothed user + item mean labels, k chosen on valid) and the wall time.

    .venv/bin/python benchmarks/cf_backbones.py --seeds 0 1 2 [--data DIR] [--json results.json]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from ccfllm.cf.reference import reference_scores
from ccfllm.cf.train import evaluate_cf, train_cf
from ccfllm.config import cf_config, to_dict
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.io import write_json
from ccfllm.metrics import split_metrics

PAPER_TEST_AUC = {"mf": 0.6482, "lightgcn": 0.5959, "sasrec": 0.7078}  # Table 3, reproduced from CoLLM
REFERENCE_K_GRID = (1, 2, 5, 10, 20, 50)
COLUMNS = (("valid", "auc"), ("valid", "uauc"), ("test", "auc"), ("test", "uauc"))


def run_backbones(dataset, models: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {model: [] for model in models}
    for model in models:
        for seed in seeds:
            config = cf_config(model, seed=seed)
            result = train_cf(config, dataset, progress=True)
            metrics = evaluate_cf(result.model, dataset)
            runs[model].append(
                {
                    **metrics,
                    "seed": seed,
                    "seconds": result.seconds,
                    "best_epoch": result.best_epoch,
                    "config": to_dict(config),
                }
            )
            print(
                f"{model} seed {seed}: test AUC {metrics['test']['auc']:.4f}, {result.seconds:.1f} s",
                flush=True,
            )
    return runs


def run_reference(dataset) -> dict:
    """The reference with its smoothing k picked by valid AUC."""
    started = time.perf_counter()
    by_k = {
        k: {
            name: split_metrics(s.uid, s.label, reference_scores(dataset, s, k))
            for name, s in (("valid", dataset.valid), ("test", dataset.test))
        }
        for k in REFERENCE_K_GRID
    }
    best_k = max(by_k, key=lambda k: by_k[k]["valid"]["auc"])
    return {**by_k[best_k], "k": best_k, "seconds": time.perf_counter() - started}


def table(runs: dict[str, list[dict]], reference: dict) -> str:
    header = (
        "| backbone | seeds | valid AUC | valid UAUC | test AUC | test UAUC | paper test AUC | s per run |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for model, model_runs in runs.items():
        cells = [_mean_std([run[split][metric] for run in model_runs]) for split, metric in COLUMNS]
        seconds = np.mean([run["seconds"] for run in model_runs])
        paper = PAPER_TEST_AUC[model]
        lines.append(f"| {model} | {len(model_runs)} | {' | '.join(cells)} | {paper:.4f} | {seconds:.0f} |")
    cells = [f"{reference[split][metric]:.4f}" for split, metric in COLUMNS]
    lines.append(
        f"| reference (k={reference['k']}) | - | {' | '.join(cells)} | - | {reference['seconds']:.1f} |"
    )
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(PAPER_TEST_AUC), choices=list(PAPER_TEST_AUC))
    parser.add_argument("--data", help="dataset folder (default: the shipped ML-1M split)")
    parser.add_argument("--json", help="also write every run's metrics to this JSON file")
    args = parser.parse_args()

    dataset = load_collm_split(resolve_data_dir(args.data))
    started = time.perf_counter()
    runs = run_backbones(dataset, args.models, args.seeds)
    reference = run_reference(dataset)
    total = time.perf_counter() - started
    print()
    print(table(runs, reference))
    print(
        f"\n{dataset.name}; {len(args.seeds)} seeds; total {total / 60:.1f} min; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    if args.json:
        write_json(args.json, {"runs": runs, "reference": reference, "seconds": total})


if __name__ == "__main__":
    main()
