"""The report's significance section: on one seed's test rows, each CCF-LLM and CoLLM run minus its
backbone, and CCF-LLM minus CoLLM on the same backbone and seed, with 95% paired bootstrap intervals
(metrics.paired_bootstrap) read from the runs' saved metrics and test scores."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .metrics import Difference, paired_bootstrap
from .paper_tables import BACKBONE_TITLES, METHOD_TITLES


def significance_section(records: list[dict], preset: str) -> str:
    """One seed at a time: each CCF-LLM and CoLLM run minus its backbone (saved by the run), and each
    CCF-LLM run minus the CoLLM run on the same backbone and seed (from both runs' test scores), in
    test AUC and UAUC, with 95% paired bootstrap intervals over users."""
    runs = [
        r
        for r in records
        if r["preset"] == preset and r["method"] in ("ccf-llm", "collm") and r["variant"] == "default"
    ]
    runs = [r for r in runs if "+" not in r["backbone"]]
    if not runs:
        return ""
    lines = [
        "## Significance: differences on one seed's test rows, with 95% paired bootstrap intervals",
        "",
        "Each cell is a difference in test AUC or UAUC and its 95% interval over 1,000 resamples of "
        "the test users (each drawn with all their rows, the same draw for both models).",
        "",
        "| run | ΔAUC vs backbone | ΔUAUC vs backbone | ΔAUC vs CoLLM | ΔUAUC vs CoLLM |",
        "|---|---|---|---|---|",
    ]
    for run in sorted(
        runs, key=lambda r: (list(BACKBONE_TITLES).index(r["backbone"]), r["method"], r["seed"])
    ):
        title = f"{METHOD_TITLES[run['method']]} ({BACKBONE_TITLES[run['backbone']]}), seed {run['seed']}"
        versus_collm = ["-", "-"]
        if run["method"] == "ccf-llm":
            versus_collm = _versus_collm(run, runs)
        lines.append(f"| {title} | {' | '.join([*_versus_backbone(run), *versus_collm])} |")
    return "\n".join(lines)


def _versus_backbone(run: dict) -> list[str]:
    """The run's own gap to its backbone, as it saved it in metrics.json."""
    metrics = _run_file(run, "metrics.json")
    if isinstance(metrics, str):
        return [metrics, ""]
    rows = json.loads(metrics.read_text()).get("significance")
    if not rows:
        return ["not saved (the run predates the check)", ""]
    return [Difference(**rows[0][name]).text() for name in ("auc", "uauc")]


def _versus_collm(run: dict, runs: list[dict]) -> list[str]:
    """CCF-LLM minus CoLLM on the same backbone and seed, from the two runs' saved test scores."""
    collm = next(
        (
            r
            for r in runs
            if r["method"] == "collm" and (r["backbone"], r["seed"]) == (run["backbone"], run["seed"])
        ),
        None,
    )
    if collm is None:
        return ["no CoLLM run on this backbone and seed", ""]
    paths = [_run_file(r, "predictions.parquet") for r in (run, collm)]
    if any(isinstance(path, str) for path in paths):
        return [next(path for path in paths if isinstance(path, str)), ""]
    ours, theirs = (pd.read_parquet(path) for path in paths)
    if not ours[["uid", "iid", "label"]].equals(theirs[["uid", "iid", "label"]]):
        return ["the two runs scored other test rows", ""]
    differences = paired_bootstrap(ours["label"], ours["uid"], ours["score"], theirs["score"])
    return [differences[name].text() for name in ("auc", "uauc")]


def _run_file(run: dict, name: str) -> Path | str:
    """A file of a recorded run's folder, or why it cannot be read."""
    path = Path(run.get("folder") or "", name)
    return path if run.get("folder") and path.is_file() else "run folder not on disk"
