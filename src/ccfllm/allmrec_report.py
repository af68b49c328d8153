"""The report of one A-LLMRec run (next_item_experiment.py): its table beside the A-LLMRec talk's figures,
the talk's claims checked on it, the speed against TALLRec, the genre answers, and the training curves.

The talk's figures are for Amazon Movies and TV with OPT-6.7B (its closest dataset to MovieLens); they
stand beside the measured ones as the shape to expect, not as the same experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError
from .io import atomic_path, make_folder, new_figure, save_png
from .run_folder import ALLMREC, record_kind

# Hit@1 on Movies and TV from the talk: main results, cold / warm items, cold users.
PAPER_HIT1 = {
    "SASRec": {"hit@1": 0.6154, "hit@1 cold": 0.2589, "hit@1 warm": 0.6787, "hit@1 cold users": 0.2589},
    "LLM alone (zero-shot, titles)": {"hit@1": 0.0121},
    "TALLRec (LoRA, titles)": {
        "hit@1": 0.2345,
        "hit@1 cold": 0.2654,
        "hit@1 warm": 0.2987,
        "hit@1 cold users": 0.2143,
    },
    "MLP-LLM": {"hit@1": 0.5838, "hit@1 cold users": 0.4909},
    "A-LLMRec": {"hit@1": 0.6237, "hit@1 cold": 0.5714, "hit@1 warm": 0.6880, "hit@1 cold users": 0.5272},
    "A-LLMRec (SBERT)": {"hit@1": None, "hit@1 cold": 0.5772, "hit@1 warm": 0.6802},
}
UNLOADABLE_BUT_REPORTABLE = "ccfllm-allmrec/1"  # its weights do not load; it has no joint-space check
PAPER_SPEEDUP = {"training": 2.53, "inference": 1.71}
COLUMNS = {
    "hit@1": "Hit@1",
    "hit@5": "Hit@5",
    "ndcg@10": "NDCG@10",
    "hit@1 cold": "Hit@1 cold items",
    "hit@1 warm": "Hit@1 warm items",
    "hit@1 cold users": "Hit@1 cold users",
}


def write_allmrec_report(run: Path, out: Path | None = None) -> Path:
    """Write report.md and curves.png for the run folder `run` into `out` (default: the run folder)."""
    record, metrics = _read_run(run)
    out = out or run
    make_folder(out)
    table = {row["model"]: row for row in metrics["table"]}
    sections = [
        _header(run, record, table),
        _claims(table),
        _results(table),
        _speed(metrics["timings"], _variant_name(table)),
        _joint_space(metrics.get("joint_space")),
        _generation(metrics["timings"].get("generation", [])),
        _curves(metrics, out / "curves.png"),
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    return path


def _read_run(run: Path) -> tuple[dict, dict]:
    paths = run / "config.json", run / "metrics.json"
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {run} is not a finished A-LLMRec run.")
    record, metrics = (json.loads(p.read_text()) for p in paths)
    if record_kind(record) != ALLMREC and record.get("format") != UNLOADABLE_BUT_REPORTABLE:
        raise CheckpointError(f"{paths[0]} is not an A-LLMRec run (format {record.get('format')!r}).")
    return record, metrics


def _header(run: Path, record: dict, table: dict) -> str:
    config, recorded = record["config"], record["dataset"]
    dataset = recorded["dataset"] if isinstance(recorded, dict) else recorded  # before 2026-11-28: a name
    rows = next(iter(table.values()))["rows"]
    settings = ", ".join(
        f"{k}={config[k]}"
        for k in ("variant", "llm", "sasrec_epochs", "stage1_epochs", "stage2_epochs", "stage2_lr", "seed")
    )
    return (
        f"# A-LLMRec on {dataset}\n\n"
        f"Run `{run}`: {rows} test rows, {config['n_candidates']} candidates each; {settings}. "
        "Each LLM model ranks a row's candidates by the mean log-probability per token of each quoted "
        "title after the prompt. The talk's figures (Amazon Movies and TV, OPT-6.7B) stand beside."
    )


def _variant_name(table: dict) -> str:
    """The trained model's row name: 'MLP-LLM' for a run without the matching loss, else 'A-LLMRec'.
    Read from the table, which names the rows it reports, rather than from the config."""
    return "MLP-LLM" if "MLP-LLM" in table else "A-LLMRec"


def _claims(table: dict) -> str:
    name = _variant_name(table)
    sasrec, zero_shot, sbert = (
        table["SASRec"],
        table["LLM alone (zero-shot, titles)"],
        table[f"{name} (SBERT)"],
    )
    checks = [
        (f"{name} > SASRec (Hit@1)", table[name]["hit@1"], sasrec["hit@1"], sasrec["rows"]),
        (f"{name} > LLM alone (Hit@1)", table[name]["hit@1"], zero_shot["hit@1"], sasrec["rows"]),
        (
            f"{name} (SBERT) > SASRec on cold items (Hit@1)",
            sbert["hit@1 cold"],
            sasrec["hit@1 cold"],
            sasrec.get("rows cold", "an unrecorded number of"),
        ),
    ]
    lines = ["## The claims, on this run", ""]
    for claim, left, right, rows in checks:
        if left is None or right is None:
            lines.append(f"- {claim}: no rows to tell")
            continue
        verdict = "holds" if left > right else "does NOT hold"
        lines.append(f"- {claim}: {verdict} ({left:.4f} vs {right:.4f}, over {rows} rows)")
    return "\n".join(lines)


def _results(table: dict) -> str:
    header = " | ".join(COLUMNS.values())
    counts = next(iter(table.values()))
    shown = ", ".join(
        f"{k}: {counts[k]}" for k in ("rows", "rows cold", "rows warm", "rows cold users") if k in counts
    )
    lines = [
        "## Next-item ranking (test rows; cold users held out of training)",
        "",
        f"Rows behind each figure: {shown}.",
        "",
        f"| model | {header} | talk's Hit@1 (all / cold / warm / cold users) |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for model, row in table.items():
        cells = " | ".join(_number(row[k]) for k in COLUMNS)
        paper = PAPER_HIT1.get(model, {})
        printed = " / ".join(
            _number(paper.get(k)) for k in ("hit@1", "hit@1 cold", "hit@1 warm", "hit@1 cold users")
        )
        lines.append(f"| {model} | {cells} | {printed} |")
    return "\n".join(lines)


def _speed(timings: dict, name: str) -> str:
    return "\n".join(
        [
            "## Speed against TALLRec (same rows, epochs, machine)",
            "",
            f"| | {name} | TALLRec | {name}'s speed-up | talk's (A-LLMRec) |",
            "|---|---|---|---|---|",
            f"| training (s) | {timings['stage2_s']:.0f} | {timings['tallrec_train_s']:.0f} "
            f"| {timings['train_speedup_vs_tallrec']:.2f}x | {PAPER_SPEEDUP['training']:.2f}x |",
            f"| inference of the test rows (s) | {timings['inference_s']:.0f} "
            f"| {timings['tallrec_inference_s']:.0f} | {timings['inference_speedup_vs_tallrec']:.2f}x "
            f"| {PAPER_SPEEDUP['inference']:.2f}x |",
            "",
            f"SASRec {timings['sasrec_s']:.0f} s, stage 1 {timings['stage1_s']:.0f} s.",
        ]
    )


def _joint_space(check: dict | None) -> str:
    if check is None:
        return "## Stage 1's joint space\n\nNot checked by the version that made this run."
    top = next(k for k in check if k.startswith("own_text_top") and not k.endswith("chance"))
    k = top.removeprefix("own_text_top")
    return "\n".join(
        [
            "## Stage 1's joint space",
            "",
            f"An item's own title is among the {k} text latents nearest its CF latent for "
            f"{check[top]:.1%} of the items (chance {check[top + '_chance']:.1%}). Spread of the latents "
            f"across items (0: every item at one point): CF {check['item_latent_spread']:.3f}, "
            f"text {check['text_latent_spread']:.3f}.",
        ]
    )


def _generation(answers: list[dict]) -> str:
    lines = ["## Language generation from the soft prompt (greedy)", ""]
    for answer in answers:
        lines.append(f"- user {answer['uid']}: {answer['question']!r} -> {answer['answer']!r}")
    return "\n".join(lines)


def _curves(metrics: dict, path: Path) -> str:

    figure, (left, right) = new_figure(1, 2, figsize=(10, 3.2))
    for name in metrics["stage1"][0] if metrics["stage1"] else []:
        left.plot([epoch[name] for epoch in metrics["stage1"]], label=name)
    left.set_xlabel("stage 1 epoch")
    left.set_yscale("log")
    left.legend(fontsize=7)
    right.plot(metrics["stage2_losses"], linewidth=0.6)
    right.set_xlabel("stage 2 step")
    right.set_ylabel("next-title loss")
    save_png(figure, path, dpi=110)
    return f"## Training curves\n\n![stage 1 losses per epoch; stage 2 loss per step]({path.name})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
