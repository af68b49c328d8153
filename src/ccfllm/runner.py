"""Run a list of (method, backbone, variant, seed) comparisons; record each finished run in a results file.

The results file is JSON Lines: a header naming the format and the dataset, then one line per finished
run with its test metrics and provenance (git commit, command, preset, seed, machine, wall time). It is
rewritten whole through a temporary file on every record, so an interrupted runner loses at most the run
in flight; a rerun skips every run already recorded. A trained CF backbone is saved once per (backbone,
seed) under the runs folder and read by every LLM run that fuses it. A run folder that is complete but
not recorded (the runner stopped between the two) is recorded without training it again. Several
runners (one per GPU) may share one plan: each claims its next run under a lock (run_plan).
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cf.checkpoint import read_metadata
from .config import CF_PRESETS, ccf_config
from .data.dataset import CTRDataset, same_dataset
from .errors import CCFLLMError
from .io import atomic_path, check_writable, file_lock, make_folder
from .methods import METHODS, uses_backbone
from .plan_claims import claim, live_claims, release, results_lock
from .run_folder import git_output, read_metrics

RESULTS_FORMAT = "ccfllm-results/1"

# Named changes to a method's settings: the ablations of Figure 3a, the strategies of Table 4, and
# CoLLM with CCF-LLM's loss.
VARIANTS: dict[str, dict] = {
    "default": {},
    "alpha-one": {"fusion": "alpha-one"},
    "alpha-scalar": {"fusion": "alpha-scalar"},
    "stage1-only": {"strategy": "stage1-only"},
    "end-to-end": {"strategy": "end-to-end"},
    "eq5": {"loss": "eq5"},
    "zero-shot": {"strategy": "zero-shot"},
}


@dataclass(frozen=True)
class Planned:
    """One run of a plan. `method` is an LLM method or a CF backbone alone (mf, lightgcn, sasrec);
    `backbone` one backbone, or two joined by '+' that CCF-LLM fuses at once (Eq. 7, Figure 3b)."""

    method: str
    backbone: str
    variant: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS and self.method not in CF_PRESETS:
            known = [*METHODS, *CF_PRESETS]
            raise CCFLLMError(f"Planned run {self}: unknown method {self.method!r}; known: {known}.")
        parts = self.backbones
        if not 1 <= len(parts) <= 2 or len(set(parts)) != len(parts) or not set(parts) <= set(CF_PRESETS):
            raise CCFLLMError(
                f"Planned run {self}: backbone {self.backbone!r} must be one of {list(CF_PRESETS)} or two "
                "different ones joined by '+'."
            )
        method = METHODS.get(self.method)
        if len(parts) == 2 and not (method and method.two_backbones):
            raise CCFLLMError(f"Planned run {self}: two fused backbones (Eq. 7) are CCF-LLM's alone.")
        if self.variant not in VARIANTS:
            raise CCFLLMError(
                f"Planned run {self}: unknown variant {self.variant!r}; known: {list(VARIANTS)}."
            )
        strategy = VARIANTS[self.variant].get("strategy")
        if method and strategy and strategy not in method.strategies:  # refused now, not hours into a plan
            raise CCFLLMError(
                f"Planned run {self}: {self.method} runs the strategies {list(method.strategies)} alone."
            )
        if self.method in CF_PRESETS and (self.method != self.backbone or self.variant != "default"):
            raise CCFLLMError(f"Planned run {self}: a CF backbone alone is itself, with the default variant.")

    @property
    def backbones(self) -> list[str]:
        return self.backbone.split("+")

    def key(self, preset: str) -> str:
        return f"{preset}/{self.method}/{self.backbone}/{self.variant}/seed{self.seed}"


def _main_plan(seeds: list[int]) -> list[Planned]:
    """Table 3's MF group and the text-only baselines (the CPU-sized core of the comparison)."""
    return [
        Planned(method, "mf", "default", seed)
        for seed in seeds
        for method in ("mf", "tallrec", "collm", "ccf-llm", "softprompt")
    ]


def _table3_runs(seed: int) -> list[Planned]:
    runs = [Planned(method, "mf", "default", seed) for method in ("tallrec", "softprompt")]
    for backbone in ("mf", "lightgcn", "sasrec"):
        runs += [Planned(m, backbone, "default", seed) for m in (backbone, "collm", "ccf-llm")]
    return runs


def _table3_plan(seeds: list[int]) -> list[Planned]:
    """Table 3: every backbone alone, with CoLLM and CCF-LLM on it, and the text-only baselines."""
    return [run for seed in seeds for run in _table3_runs(seed)]


def _full_plan(seeds: list[int]) -> list[Planned]:
    """Table 3; Table 2's pilot (MF); Table 4's strategies and Figure 3a's fusions on LightGCN, as the
    paper runs them; Figure 3b's pairs of backbones."""
    runs = []
    for seed in seeds:
        runs += _table3_runs(seed)
        runs += [
            Planned("ccf-llm", "lightgcn", v, seed)
            for v in ("stage1-only", "end-to-end", "alpha-one", "alpha-scalar")
        ]
        runs += [
            Planned("ccf-llm", pair, "default", seed)
            for pair in ("lightgcn+mf", "lightgcn+sasrec", "mf+sasrec")
        ]
        runs += [
            Planned("tallrec", "mf", "zero-shot", seed),
            Planned("tallrec-cf", "mf", "zero-shot", seed),
            Planned("tallrec-cf", "mf", "default", seed),
        ]
    return runs


PLANS = {"main": _main_plan, "table3": _table3_plan, "full": _full_plan}


def make_plan(name_or_file: str, seeds: list[int]) -> list[Planned]:
    """A named plan over `seeds`, or a JSON file holding a list of {method, backbone, variant, seed}."""
    if name_or_file in PLANS:
        return PLANS[name_or_file](seeds)
    path = Path(name_or_file)
    if not path.is_file():
        raise CCFLLMError(f"No plan {name_or_file!r}: name one of {sorted(PLANS)} or a JSON file.")
    try:
        entries = json.loads(path.read_text())
        return [Planned(**entry) for entry in entries]
    except (json.JSONDecodeError, TypeError) as exc:
        raise CCFLLMError(
            f"Plan file {path} must be a JSON list of {{method, backbone, variant, seed}} objects ({exc})."
        ) from exc


# -- the results file ---------------------------------------------------------------------------------


def read_results(path: Path, dataset: CTRDataset) -> list[dict]:
    """The records of a results file written for `dataset`; [] if the file does not exist."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        header, *records = [json.loads(line) for line in lines]
    except (json.JSONDecodeError, ValueError) as exc:
        raise CCFLLMError(
            f"{path} is not a readable results file ({exc}); move it away or name another --results file."
        ) from exc
    if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
        raise CCFLLMError(f"{path} is not a ccfllm results file (no {RESULTS_FORMAT!r} header).")
    if not same_dataset(header.get("dataset"), dataset.fingerprint()):
        raise CCFLLMError(
            f"{path} holds results on {header.get('dataset')}, not on {dataset.fingerprint()}: "
            "name another --results file for this dataset."
        )
    return records


def write_results(path: Path, dataset: CTRDataset, records: list[dict]) -> None:
    header = {"format": RESULTS_FORMAT, "dataset": dataset.fingerprint()}
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in [header, *records]))


# -- running ------------------------------------------------------------------------------------------


def run_plan(
    plan: list[Planned],
    dataset: CTRDataset,
    results: Path,
    runs: Path,
    preset: str = "cpu",
    overrides: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every planned run not yet in `results`, recording each as it finishes; return all records.

    Several runners may share one plan and one results file (one per GPU, `docs/distributed.md`): each
    claims the next run nobody has recorded or claimed, under a lock on the results file, so no run
    is trained twice and every record is kept. A claim whose runner died on this host is taken over."""
    records = read_results(results, dataset)
    check_writable(results)  # before the first run trains, not after it
    check_writable(runs / "cf")
    # Taken once, at start: the code a resumed sitting runs is the code it started with.
    provenance = {"commit": _git_commit(results), "command": shlex.join(sys.argv), "machine": _machine()}
    plan = list(dict.fromkeys(plan))
    recorded = sum(p.key(preset) in {r["key"] for r in records} for p in plan)
    print(f"{recorded} of {len(plan)} planned runs already recorded in {results}", flush=True)
    while (claimed := _claim_next(plan, preset, dataset, results)) is not None:
        planned, records = claimed
        print(f"\n[{len(records) + 1}/{len(plan)}] {planned.key(preset)}", flush=True)
        try:
            started = time.perf_counter()
            row = _run_one(planned, dataset, runs, preset, overrides or {}, progress, records)
            wall = {**provenance, "wall_s": time.perf_counter() - started}
            with results_lock(results):
                records = read_results(results, dataset)
                write_results(results, dataset, [*records, _record(planned, preset, row, wall)])
        finally:
            release(results, planned.key(preset))
    elsewhere = live_claims(results)
    if elsewhere:
        print(f"{len(elsewhere)} planned runs are being run by other runners: {', '.join(elsewhere)}")
    return read_results(results, dataset)


def _claim_next(
    plan: list[Planned], preset: str, dataset: CTRDataset, results: Path
) -> tuple[Planned, list[dict]] | None:
    """The first planned run neither recorded nor claimed by a live runner, now claimed by this one,
    with the records as they stand; None when there is none left to take."""
    with results_lock(results):
        records = read_results(results, dataset)
        done = {record["key"] for record in records}
        claims = live_claims(results)
        free = [p for p in plan if p.key(preset) not in done and p.key(preset) not in claims]
        if not free:
            return None
        claim(results, free[0].key(preset), claims)
    return free[0], records


def _run_one(
    planned: Planned,
    dataset: CTRDataset,
    runs: Path,
    preset: str,
    overrides: dict,
    progress: bool,
    records: list[dict],
) -> dict:
    """The finished run's test metrics and what it was: {model, test_auc, test_uauc, valid_auc, folder};
    stage 1 comes from a recorded run that trained the same one, where there is such a run."""
    cf_folders = [
        _backbone_folder(
            runs,
            ccf_config(preset, **{**overrides, "cf_model": name, "seed": planned.seed}),
            dataset,
            progress,
        )
        for name in planned.backbones
    ]
    cf_folder = cf_folders[0]
    if planned.method in CF_PRESETS:
        metrics = read_metrics(cf_folder)
        return {
            "model": f"{planned.method} (CF backbone alone)",
            "test_auc": metrics["test"]["auc"],
            "test_uauc": metrics["test"]["uauc"],
            "valid_auc": metrics["valid"]["auc"],
            "folder": str(cf_folder),
        }
    from .experiment import run_ccf_llm

    settings = {**overrides, **VARIANTS[planned.variant], "method": planned.method}
    settings.update(cf_model=planned.backbones[0], seed=planned.seed)
    if uses_backbone(METHODS[planned.method]):
        settings["cf_checkpoint"] = str(cf_folder.resolve())
    if len(cf_folders) == 2:
        settings.update(cf_model2=planned.backbones[1], cf_checkpoint2=str(cf_folders[1].resolve()))
    donor = _stage1_donor(ccf_config(preset, **settings), records)
    if donor:
        settings["stage1_from"] = donor["folder"]
    config = ccf_config(preset, **settings)
    folder = runs / planned.key(preset)
    if not (folder / "metrics.json").is_file():
        # a run interrupted in an earlier sitting continues from its last finished stage
        run_ccf_llm(config, dataset, folder, overwrite=folder.exists(), progress=progress, resume=True)
    metrics = read_metrics(folder)
    stages = metrics["stages"]
    final = metrics["table"][-1]
    return {
        **final,
        "valid_auc": max((s["best_valid_auc"] for s in stages), default=None),
        "stages": [
            {**row, "stage": s["stage"], "best_valid_auc": s["best_valid_auc"], "seconds": s["seconds"]}
            for row, s in zip(metrics["table"][len(metrics["table"]) - len(stages) :], stages, strict=True)
        ],
        "folder": str(folder),
        "stage1_from": donor["key"] if donor else None,
        "resumed_stages": metrics.get("resumed_stages", []),
    }


def _stage1_donor(config, records: list[dict]) -> dict | None:
    """A recorded run (its record) whose stage 1 is the one `config` would train, if any."""
    from .recommender import read_run_config
    from .schedule import stage1_signature

    wanted = stage1_signature(config)
    if wanted is None:
        return None
    for record in records:
        folder = Path(record["folder"])
        if record["method"] in METHODS and (folder / "adapter").is_dir():
            if stage1_signature(read_run_config(folder)["config"]) == wanted:
                return record
    return None


def _backbone_folder(runs: Path, config, dataset: CTRDataset, progress: bool) -> Path:
    """The (backbone, seed) checkpoint every run of that pair shares, trained on first use."""
    from .experiment import train_backbone

    folder = runs / "cf" / f"{config.cf_model}-h{max(config.max_history, 1)}-seed{config.seed}"
    locks = make_folder(runs / ".locks")
    with file_lock(locks / f"cf-{folder.name}"):  # another runner may be training it
        try:
            read_metadata(folder)
        except CCFLLMError:
            train_backbone(config, dataset, folder, progress)
    return folder


def _record(planned: Planned, preset: str, row: dict, provenance: dict) -> dict:
    finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    wall_s = round(provenance["wall_s"], 1)
    return {
        "key": planned.key(preset),
        **asdict(planned),
        "preset": preset,
        **row,
        "provenance": {**provenance, "wall_s": wall_s, "finished": finished},
    }


def _git_commit(results: Path) -> str:
    """HEAD's short hash, "-dirty" when tracked files other than the results file being written differ."""

    commit = git_output("rev-parse", "--short", "HEAD") or "unknown"
    top = Path(git_output("rev-parse", "--show-toplevel") or ".")
    changed = [line[3:] for line in git_output("status", "--porcelain", "--untracked-files=no").splitlines()]
    # A resumed comparison appends to a committed results file: that change is the runner's own output.
    dirty = [path for path in changed if (top / path).resolve() != results.resolve()]
    return commit + ("-dirty" if dirty else "")


def _machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.node()}"


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "cpu"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")
