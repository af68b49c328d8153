"""How much of a backbone's test AUC its embeddings carry without the biases: train MF with the preset
and with weak L2 on the embeddings, and print the test AUC of the full logit and of the dot product alone.

    .venv/bin/python benchmarks/cf_embedding_signal.py [--model mf] [--weak-decay 1e-3] [--data DIR]
"""

from __future__ import annotations

import argparse

import torch

from ccfllm.cf.train import SplitTensors, train_cf
from ccfllm.config import cf_config
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.metrics import auc


@torch.no_grad()
def full_and_dot_auc(model, dataset) -> tuple[float, float]:
    rows = SplitTensors.of(dataset.test, model.config.max_history, torch.device("cpu"))
    users, items = model.encode(rows.uid, rows.iid, rows.history)
    full = model.score(users, items, rows.uid, rows.iid)
    return auc(dataset.test.label, full.numpy()), auc(dataset.test.label, (users * items).sum(-1).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mf", choices=["mf", "lightgcn", "sasrec"])
    parser.add_argument("--weak-decay", type=float, default=1e-3)
    parser.add_argument("--data")
    args = parser.parse_args()
    dataset = load_collm_split(resolve_data_dir(args.data))
    print("| settings | test AUC (logit) | test AUC (dot product only) |\n|---|---|---|")
    for label, overrides in (
        ("preset", {}),
        (f"weight_decay={args.weak_decay:g}", {"weight_decay": args.weak_decay}),
    ):
        model = train_cf(cf_config(args.model, device="cpu", **overrides), dataset, progress=False).model
        full, dot = full_and_dot_auc(model, dataset)
        print(f"| {args.model} {label} | {full:.4f} | {dot:.4f} |")


if __name__ == "__main__":
    main()
