"""CCF-LLM end to end on a tiny dataset and a tiny Llama built in code, on any device: checks that the
whole path (CF backbone, LoRA stage, fusion stage, saving, reloading, scoring) runs there, in bf16,
and that the reloaded run reproduces its test AUC. Prints what it measured.

    .venv/bin/python benchmarks/device_smoke.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ccfllm.config import ccf_config  # noqa: E402
from ccfllm.data import load_collm_split  # noqa: E402
from ccfllm.experiment import run_ccf_llm
from ccfllm.recommender import evaluate_run, load_run
from conftest import TINY_CCF, save_tiny_llama, write_tiny_split  # noqa: E402  (the tests' tiny data and LLM)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_collm_split(write_tiny_split(Path(tmp) / "tiny"), max_history=5)
        llm = save_tiny_llama(Path(tmp) / "llm", dataset.item_titles, hidden_size=64, kv_heads=2)
        config = ccf_config(
            "cpu", **{**TINY_CCF, "llm": str(llm), "device": args.device, "dtype": args.dtype}
        )
        started = time.perf_counter()
        result = run_ccf_llm(config, dataset, Path(tmp) / "run", progress=False)
        trained = time.perf_counter() - started
        reloaded = load_run(result.folder, dataset, device=args.device)
        parameter = next(reloaded.model.llm.parameters())
        again = evaluate_run(reloaded, dataset, ("test",), progress=False)["test"]["auc"]
        print(f"device {parameter.device}, LLM dtype {parameter.dtype}, torch {torch.__version__}")
        for row in result.table:
            print(f"{row['model']:<28} test AUC {row['test_auc']:.4f}")
        same = again == result.table[-1]["test_auc"]
        print(f"trained in {trained:.1f} s; reloaded test AUC {again:.4f} (identical: {same})")


if __name__ == "__main__":
    main()
