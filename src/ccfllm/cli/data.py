"""`ccfllm data`: inspect a dataset, convert raw MovieLens / Amazon / interaction files."""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from ..data import convert_amazon, convert_movielens, load_collm_split, resolve_data_dir
from .base import (
    DATA_OPTION_HELP,
    main,
)

# -- data ----------------------------------------------------------------------------------------


@main.group()
def data() -> None:
    """Inspect a dataset or build one from raw MovieLens / Amazon files."""


@data.command("inspect")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help=DATA_OPTION_HELP)
@click.option("--max-history", default=10, show_default=True, help="Liked items kept per row.")
def data_inspect(data_dir: str | None, max_history: int) -> None:
    """Counts per split: rows, users, items, label balance, cold items and users, history length."""
    dataset = load_collm_split(resolve_data_dir(data_dir), max_history=max_history)
    click.echo(f"dataset {dataset.name} ({dataset.domain}) at {dataset.source}")
    click.echo(f"{dataset.n_users - 1} users, {dataset.n_items - 1} items (ids from 1; 0 is padding)")
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        click.echo(dataset.summary().to_string())


@data.command("convert-movielens")
@click.argument("raw_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_movielens(raw_dir: str, out_dir: str, overwrite: bool) -> None:
    """Build CoLLM's ML-1M split from RAW_DIR (ratings.dat, movies.dat) into OUT_DIR."""
    _report_conversion(convert_movielens(raw_dir, out_dir, overwrite=overwrite))


@data.command("convert-amazon")
@click.argument("reviews", type=click.Path(exists=True, dir_okay=False))
@click.argument("meta", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_amazon(reviews: str, meta: str, out_dir: str, overwrite: bool) -> None:
    """Build CoLLM's Amazon-Book split from REVIEWS (Books_5.json[.gz]) and META (meta_Books.json[.gz])."""
    _report_conversion(convert_amazon(reviews, meta, out_dir, overwrite=overwrite))


@data.command("convert-interactions")
@click.argument("interactions", type=click.Path(exists=True, dir_okay=False))
@click.argument("items", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--split",
    "split_kind",
    type=click.Choice(["fractions", "time"]),
    default="fractions",
    show_default=True,
    help="Split by time: the latest fractions of the rows, or at two moments.",
)
@click.option("--valid-fraction", default=0.1, show_default=True, help="With --split fractions.")
@click.option("--test-fraction", default=0.1, show_default=True, help="With --split fractions.")
@click.option("--valid-from", help="With --split time: when valid starts (unix seconds or a date).")
@click.option("--test-from", help="With --split time: when test starts (unix seconds or a date).")
@click.option("--label-threshold", default=4.0, show_default=True, help="label = rating >= this.")
@click.option("--history-length", default=10, show_default=True, help="Liked items kept in each row's his.")
@click.option("--domain", default="movies", show_default=True, help="The prompt's noun: 'movies' or 'books'.")
@click.option("--name", help="The dataset's name (default: OUT_DIR's).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def data_convert_interactions(
    interactions, items, out_dir, split_kind, valid_fraction, test_fraction, valid_from, test_from,
    label_threshold, history_length, domain, name, overwrite,
) -> None:  # fmt: skip
    """Build a split from your own INTERACTIONS (user, item, rating or label, timestamp) and ITEMS
    (item, title) files, CSV, TSV or Parquet. The folder's format: docs/dataset-format.md."""
    from ..data.interactions import SplitRule, convert_interactions

    rule = SplitRule(split_kind, valid_fraction, test_fraction, valid_from, test_from)
    out = convert_interactions(
        interactions, items, out_dir, rule, label_threshold, history_length, domain, name, overwrite
    )
    _report_conversion(out)


def _report_conversion(out_dir: Path) -> None:
    dataset = load_collm_split(out_dir)
    click.echo(f"wrote {out_dir}")
    click.echo(dataset.summary()[["rows", "users", "items", "positive_rate"]].to_string())
