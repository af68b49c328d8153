"""`ccfllm cf`: train and evaluate the CF backbones."""

from __future__ import annotations

import json
import time

import click
import pandas as pd

from ..config import (
    CFConfig,
    cf_config,
    to_dict,
)
from ..data import load_collm_split, resolve_data_dir
from .base import (
    DATA_OPTION_HELP,
    SPLITS_OPTION,
    echo_metrics,
    main,
    setting_overrides,
    settings_epilog,
    training_run_options,
    unused_run_folder,
)


@main.group()
def cf() -> None:
    """Train and evaluate the collaborative-filtering backbones (MF, LightGCN, SASRec)."""


@cf.command("train", epilog=settings_epilog(CFConfig, "the backbone's preset"))
@click.option("--model", type=click.Choice(["mf", "lightgcn", "sasrec"]), required=True, help="Backbone.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/cf/MODEL-seedSEED).")
@click.option("--seed", type=int, default=None, help="Seed for initialisation and data order (default 0).")
@training_run_options
def cf_train(model, data_dir, out, seed, settings, overwrite, quiet) -> None:
    """Train a backbone on train, early-stop on valid AUC, evaluate, save weights and embeddings."""
    from ..cf.checkpoint import save_cf
    from ..cf.train import evaluate_cf, train_cf

    config = cf_config(model, **setting_overrides(settings, seed))
    out = unused_run_folder(out or f"runs/cf/{model}-seed{config.seed}", overwrite)
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=config.max_history)
    result = train_cf(config, dataset, progress=not quiet)
    metrics = evaluate_cf(result.model, dataset)
    record = {
        **metrics,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 2),
        "config": to_dict(config),
    }
    save_cf(result.model, dataset, out, record, overwrite=overwrite)
    click.echo(f"{model}: best epoch {result.best_epoch}, {result.seconds:.1f} s; saved {out}")
    echo_metrics(metrics)


@cf.command("evaluate")
@click.option(
    "--checkpoint", type=click.Path(exists=True, file_okay=False), required=True, help="Run folder."
)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@SPLITS_OPTION
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    help="Also write uid, iid, label, score of the last split to this Parquet file.",
)
def cf_evaluate(checkpoint, data_dir, splits, predictions) -> None:
    """Reload a saved backbone and report AUC / UAUC on the dataset it was trained on."""
    from ..cf.checkpoint import load_cf, read_metadata
    from ..cf.train import predict_split
    from ..io import atomic_path
    from ..metrics import split_metrics

    config = json.loads(read_metadata(checkpoint)["config"])
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=config["max_history"])
    model = load_cf(checkpoint, dataset=dataset, device=config["device"])
    metrics = {}
    started = time.perf_counter()
    for name in splits or ("valid", "test"):
        split = dataset.splits[name]
        scores = predict_split(model, split)
        metrics[name] = split_metrics(split.uid, split.label, scores)
    click.echo(f"{config['model']} from {checkpoint} ({time.perf_counter() - started:.1f} s)")
    echo_metrics(metrics)
    if predictions:
        frame = pd.DataFrame({"uid": split.uid, "iid": split.iid, "label": split.label, "score": scores})
        with atomic_path(predictions) as tmp:
            frame.to_parquet(tmp, index=False)
        click.echo(f"wrote {len(frame)} predictions of {name} to {predictions}")
