"""The paper's tables and figures from a results file (runner.py), each beside the paper's own figures.

Every measured cell is the mean over the seeds recorded for that run, with the sample standard
deviation and the number of seeds; a row nobody has run says so. RelaImpr (Eq. 6) is computed on the
mean AUCs against the row's base, as the paper does: the CF backbone in each backbone group, Softprompt
for the methods without a CF model, and the default strategy in Table 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CCF_PRESETS, ccf_config
from .errors import CCFLLMError
from .io import atomic_path, make_folder, new_figure, save_png
from .metrics import rela_impr
from .paper_tables import (
    BACKBONE_TITLES,
    FUSION_VARIANTS,
    METHOD_TITLES,
    PAPER_BEST,
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    STRATEGY_TITLES,
    TABLE2_ROWS,
    TABLE4_BACKBONE,
)
from .report_significance import significance_section

# RelaImpr divides by the base's lift above 0.5: under 0.02 of lift, a 0.001 move of the base moves it by
# more than 5 points, so against such a base (or one at or below chance) it is not printed.
BASE_LIFT_MIN = 0.02


@dataclass
class Cell:
    """A run's test metrics over its recorded seeds."""

    aucs: list[float]
    uaucs: list[float]

    @property
    def n(self) -> int:
        return len(self.aucs)

    @property
    def auc(self) -> float:
        return float(np.mean(self.aucs))

    def text(self, values: list[float] | None = None) -> str:
        values = self.aucs if values is None else values
        if len(values) == 1:
            return f"{values[0]:.4f} (1 seed)"
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} ({len(values)} seeds)"


def summarise(records: list[dict], preset: str) -> dict[tuple[str, str, str], Cell]:
    """(method, backbone, variant) -> the test AUCs and UAUCs of its recorded seeds, for one preset."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for record in records:
        if record["preset"] != preset:
            continue
        cell = cells.setdefault((record["method"], record["backbone"], record["variant"]), Cell([], []))
        cell.aucs.append(record["test_auc"])
        cell.uaucs.append(record["test_uauc"])
    return cells


def write_report(
    records: list[dict],
    out: Path,
    preset: str,
    source: str,
    inside: tuple | None = None,
    beside: tuple[str, ...] = (),
) -> Path:
    """Write report.md (and the figures' PNGs) into `out`; return the markdown file. `inside`, a
    (loaded CCF-LLM run, its folder, dataset), adds Figure 4 and Table 5. Each preset of `beside` (say
    the embedded LLM's `cpu` beside `cpu-1.5b`) adds a measured column to Tables 2 and 3."""
    cells = summarise(records, preset)
    others = {other: summarise(records, other) for other in beside if other != preset}
    for name, summary in [(preset, cells), *others.items()]:
        if not summary:
            raise CCFLLMError(f"{source} holds no runs of the {name!r} preset; nothing to report.")
    make_folder(out)
    sections = [
        _header(records, [preset, *others], source),
        _ordering(cells),
        _table2(cells, others),
        _table3(cells, others),
        significance_section(records, preset),
        _table4(cells),
        _figure3a(cells, out),
        _figure3b(cells, out),
        *(_inside(*inside, out) if inside else []),
        _not_yet(inside is not None),
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(section for section in sections if section) + "\n")
    return path


def saved_ccf_llm_run(records: list[dict], preset: str) -> Path | None:
    """The folder of a recorded two-stage CCF-LLM run on one backbone that is still on disk, for Figure 4
    and Table 5: MF's first, then the other backbones' in the results' order."""
    runs = [
        r
        for r in records
        if r["preset"] == preset
        and r["method"] == "ccf-llm"
        and r["variant"] == "default"
        and "+" not in r["backbone"]
    ]
    runs.sort(key=lambda r: r["backbone"] != "mf")  # stable: keeps the results' order within each group
    return next((Path(r["folder"]) for r in runs if Path(r["folder"], "config.json").is_file()), None)


# -- sections -------------------------------------------------------------------------------------------


def preset_llm(preset: str) -> str:
    """The LLM a preset's runs read."""
    return ccf_config(preset).llm if preset in CCF_PRESETS else "unknown LLM"


def _header(records: list[dict], presets: list[str], source: str) -> str:
    chosen = [r for r in records if r["preset"] in presets]
    commits = sorted({r["provenance"]["commit"] for r in chosen})
    machines = sorted({r["provenance"]["machine"] for r in chosen})
    hours = sum(r["provenance"]["wall_s"] for r in chosen) / 3600
    main, *others = presets
    beside = "".join(f"; beside it, the `{p}` preset's ({preset_llm(p)}) in its own column" for p in others)
    return "\n".join(
        [
            f"# CCF-LLM and its baselines: the `{main}` preset ({preset_llm(main)})",
            "",
            f"From `{source}`: {len(chosen)} finished runs, {hours:.1f} hours of training and testing, "
            f"code at {', '.join(commits)}, on {'; '.join(machines)}. Each measured cell is the test AUC "
            "(mean ± sample standard deviation over the recorded seeds, and how many)"
            f"{beside}; the paper's figures are its Vicuna-7B results (5 runs each), not a target for a "
            "small LLM.",
        ]
    )


def _ordering(cells: dict) -> str:
    """The paper's central claims, checked on the measured means."""
    means = {key: cell.auc for key, cell in cells.items()}
    lines = ["## The paper's claims, on these runs", ""]
    for backbone in BACKBONE_TITLES:
        ccf, collm = means.get(("ccf-llm", backbone, "default")), means.get(("collm", backbone, "default"))
        cf, tallrec = means.get((backbone, backbone, "default")), means.get(("tallrec", "mf", "default"))
        if ccf is None:
            continue
        name = BACKBONE_TITLES[backbone]
        for claim, left, right in [
            (f"CCF-LLM ({name}) > CoLLM ({name})", ccf, collm),
            (f"CoLLM ({name}) > TallRec", collm, tallrec),
            (f"CCF-LLM ({name}) > {name}", ccf, cf),
        ]:
            if left is None or right is None:
                lines.append(f"- {claim}: not measured (a side has no run)")
            else:
                verdict = "holds" if left > right else "does NOT hold"
                lines.append(f"- {claim}: {verdict} ({left:.4f} vs {right:.4f})")
    return "\n".join(lines)


def _table2(cells: dict, others: dict[str, dict]) -> str:
    lines = [
        "## Table 2: pilot study, collaborative signal written as text (MF's top-10 test items)",
        "",
        f"| method | test AUC (measured) |{_beside_titles(others)} paper AUC (Vicuna-7B) |",
        "|---|---|" + "---|" * len(others) + "---|",
    ]
    rows = [
        ((method, "mf", variant), title, PAPER_TABLE2[(method, variant)])
        for (method, variant), title in TABLE2_ROWS.items()
    ]
    rows += [
        ((method, "mf", "default"), title, PAPER_TABLE3[(method, "mf")][0])
        for method, title in (("mf", "MF"), ("collm", "CoLLM (MF)"), ("ccf-llm", "CCF-LLM (MF)"))
    ]
    for key, title, paper_auc in rows:
        lines.append(
            f"| {title} | {_measured(cells.get(key))} |{_beside_cells(others, key)} {paper_auc:.4f} |"
        )
    return "\n".join(lines)


def _table3(cells: dict, others: dict[str, dict]) -> str:
    lines = [
        "## Table 3: overall performance (MovieLens-1M)",
        "",
        "| method | test AUC (measured) | RelaImpr | test UAUC (measured) |"
        f"{_beside_titles(others)} paper AUC | paper RelaImpr |",
        "|---|---|---|---|" + "---|" * len(others) + "---|---|",
    ]
    for backbone, title in BACKBONE_TITLES.items():
        base_key = (backbone, backbone)
        for method in (backbone, "collm", "ccf-llm"):
            label = title if method == backbone else f"{METHOD_TITLES[method]} ({title})"
            lines.append(_row(cells, others, label, (method, backbone), base_key, PAPER_TABLE3))
    for method in ("softprompt", "tallrec"):
        lines.append(
            _row(cells, others, METHOD_TITLES[method], (method, "mf"), ("softprompt", "mf"), PAPER_TABLE3)
        )
    for method in ("collm", "ccf-llm"):
        best = _best_backbone(cells, method)
        label = f"{METHOD_TITLES[method]} (Best{f': {BACKBONE_TITLES[best]}' if best else ''})"
        key = (method, best or "mf")
        lines.append(_row(cells, others, label, key, ("softprompt", "mf"), {key: PAPER_BEST[method]}))
    return "\n".join(lines)


def _table4(cells: dict) -> str:
    name = BACKBONE_TITLES[TABLE4_BACKBONE]
    lines = [
        f"## Table 4: training strategies (CCF-LLM with {name}, as the paper)",
        "",
        "| strategy | test AUC (measured) | RelaImpr | paper AUC | paper RelaImpr |",
        "|---|---|---|---|---|",
    ]
    default = cells.get(("ccf-llm", TABLE4_BACKBONE, "default"))
    for variant, title in STRATEGY_TITLES.items():
        cell = cells.get(("ccf-llm", TABLE4_BACKBONE, variant))
        measured = _measured(cell)
        impr = _impr(cell, default) if variant != "default" else "-"
        paper, paper_impr = PAPER_TABLE4[variant]
        lines.append(f"| {title} | {measured} | {impr} | {paper:.4f} | {paper_impr} |")
    return "\n".join(lines)


def _figure3a(cells: dict, out: Path) -> str:
    """How to fuse: α = 1, α ∈ R, CoLLM and CCF-LLM, on LightGCN."""
    backbone = TABLE4_BACKBONE
    bars = {title: cells.get(("ccf-llm", backbone, variant)) for variant, title in FUSION_VARIANTS.items()}
    bars["CoLLM"] = cells.get(("collm", backbone, "default"))
    bars["CCF-LLM"] = cells.get(("ccf-llm", backbone, "default"))
    title = f"How to fuse ({BACKBONE_TITLES[backbone]})"
    heading = f"Figure 3a: how to fuse ({BACKBONE_TITLES[backbone]})"
    return _bar_section(heading, "fusion", bars, out / "figure3a.png", title)


def _figure3b(cells: dict, out: Path) -> str:
    """What to fuse: CCF-LLM on one backbone (L, M, S) and on two at once (Eq. 7)."""
    letters = {"lightgcn": "L", "mf": "M", "sasrec": "S"}
    backbones = ["lightgcn", "mf", "sasrec", "lightgcn+mf", "lightgcn+sasrec", "mf+sasrec"]
    bars = {
        "+".join(letters[b] for b in k.split("+")): cells.get(("ccf-llm", k, "default")) for k in backbones
    }
    heading = "Figure 3b: what to fuse (CCF-LLM on one backbone, and on two at once, Eq. 7)"
    return _bar_section(heading, "CF embeddings fused", bars, out / "figure3b.png", "What to fuse")


def _bar_section(heading: str, column: str, bars: dict, png: Path, chart_title: str) -> str:
    """A figure of the paper's that has no numbers in its text: the measured table, and its bar chart."""
    lines = [
        f"## {heading}",
        "",
        "The paper gives these as a bar chart only (no numbers in its text).",
        "",
        f"| {column} | test AUC (measured) |",
        "|---|---|",
    ]
    lines += [f"| {title} | {_measured(cell)} |" for title, cell in bars.items()]
    measured = {title: cell for title, cell in bars.items() if cell}
    if measured:
        _bar_chart(measured, png, chart_title)
        lines += ["", f"![{heading.split(':')[0]}]({png.name})"]
    return "\n".join(lines)


def _inside(recommender, folder: Path, dataset, out: Path) -> list[str]:
    """Figure 4 and Table 5, from one saved CCF-LLM run."""
    from .analysis import VIEWS, case_study, item_views, tsne_figure

    views = item_views(recommender, dataset)
    tsne_figure(views, out / "figure4.png")
    table = case_study(recommender, dataset)
    ranks = [c for c in table.columns if c.startswith("rank by")]
    rows = [
        "| " + " | ".join([str(r["iid"]), r["title"], _liked(r["label"]), *(str(r[c]) for c in ranks)]) + " |"
        for r in table.to_dict("records")
    ]
    return [
        "\n".join(
            [
                f"## Figure 4: t-SNE of {len(views['iid'])} items' {', '.join(VIEWS)} embeddings",
                "",
                f"From the run `{folder}`: ALG(x_i^CF), the mean of the title tokens' input embeddings "
                "and the mean of the fused title tokens (Eq. 4), each view scaled to unit mean norm, "
                "in one t-SNE.",
                "",
                "![Figure 4](figure4.png)",
            ]
        ),
        "\n".join(
            [
                f"## Table 5: case study, user {int(table.uid.iloc[0])}'s test items ranked three ways",
                "",
                "Rank 1 is the scorer's most recommended of the five; the zero-shot LLM is the same LLM with "
                "the LoRA adapter switched off, reading TALLRec's prompt.",
                "",
                "| item | title | label | " + " | ".join(ranks) + " |",
                "|---|---|---|" + "---|" * len(ranks),
                *rows,
            ]
        ),
    ]


def _liked(label: int) -> str:
    return "liked" if label else "not liked"


def _not_yet(with_inside: bool) -> str:
    if with_inside:
        return ""
    missing = (
        "Figure 4 and Table 5 need a saved CCF-LLM run; none of the recorded ones is on disk "
        "(`ccfllm report --run`)."
    )
    return "\n".join(["## Not in this report", "", missing])


# -- pieces ---------------------------------------------------------------------------------------------


def _row(cells: dict, others: dict[str, dict], label: str, key: tuple, base_key: tuple, paper: dict) -> str:
    cell, base = cells.get((*key, "default")), cells.get((*base_key, "default"))
    measured = _measured(cell)
    uauc = cell.text(cell.uaucs) if cell else ""
    impr = "-" if key == base_key else _impr(cell, base)
    paper_auc, paper_impr = paper[key]
    beside = _beside_cells(others, (*key, "default"))
    return f"| {label} | {measured} | {impr} | {uauc} |{beside} {paper_auc:.4f} | {paper_impr} |"


def _beside_titles(others: dict[str, dict]) -> str:
    return "".join(f" test AUC, `{preset}` ({preset_llm(preset)}) |" for preset in others)


def _beside_cells(others: dict[str, dict], key: tuple) -> str:
    return "".join(f" {_measured(cells.get(key))} |" for cells in others.values())


def _measured(cell: Cell | None) -> str:
    return cell.text() if cell else "not run"


def _impr(cell: Cell | None, base: Cell | None) -> str:
    if cell is None or base is None:
        return ""
    if base.auc - 0.5 < BASE_LIFT_MIN:
        return f"n/a (base {base.auc:.4f}, near chance)"
    return f"{rela_impr(cell.auc, base.auc):.2f}%"


def _best_backbone(cells: dict, method: str) -> str | None:
    measured = {
        b: cells[(method, b, "default")].auc for b in BACKBONE_TITLES if (method, b, "default") in cells
    }
    return max(measured, key=measured.get) if measured else None


def _bar_chart(cells: dict[str, Cell], path: Path, title: str) -> None:

    names = list(cells)
    means = [cells[n].auc for n in names]
    errors = [np.std(cells[n].aucs, ddof=1) if cells[n].n > 1 else 0.0 for n in names]
    figure, axis = new_figure(figsize=(1.4 * len(names) + 1.5, 3.2))
    axis.bar(names, means, yerr=errors, capsize=4, color="#4c72b0")
    low = min(m - e for m, e in zip(means, errors, strict=True))
    axis.set_ylim(max(0.0, low - 0.02), max(means) + 0.02)
    axis.set_ylabel("test AUC")
    axis.set_title(title)
    save_png(figure, path, dpi=120)
