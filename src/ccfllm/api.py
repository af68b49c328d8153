"""Use a trained run from Python: `ccfllm.load(run_dir)` and a recommender to ask.

    import ccfllm
    model = ccfllm.load("runs/ccf-llm/mf-cpu-seed0", data="../shared/data/ml-1m-collm")
    model.score(pd.DataFrame({"uid": [1, 1], "iid": [10, 20]}))   # uid, iid, score, cf
    model.recommend(1, k=10)                                       # rank, iid, title, score, cf
    model.explain(1, 10)                                           # alpha per title token; CF/text split

A CCF-LLM run (or a baseline trained by `ccfllm train`) loads as a `CCFRecommender`; an A-LLMRec run
(`ccfllm allmrec train`) as a `NextItemRecommender`, which ranks a user's candidate items (`.rank`).
Scores are those the engine computes (`engine.score_rows`), the same as `ccfllm predict` writes.

A row's history is the `history` it is given (a list of liked item ids, oldest first), else the user's
liked items in the dataset, most recent last (the cold-start policy of `prediction.predict_rows`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import CCFLLMError

if TYPE_CHECKING:  # the heavy modules load with the run, not with `import ccfllm`
    from .data.dataset import CTRDataset
    from .explanation import Explanation

# Rows are loaded with CoLLM's 10 most recent likes, as the CLI loads them (cli.CF_HISTORY).
DATA_HISTORY = 10


def load(
    run_dir: str | Path,
    data: str | Path | CTRDataset | None = None,
    device: str = "auto",
    compile_scoring: bool | None = None,
) -> CCFRecommender | NextItemRecommender:
    """A saved run, ready to score. `data` is the dataset it was trained on: a CoLLM-format folder, a
    loaded CTRDataset, or None for $CCFLLM_DATA / ../shared/data/ml-1m-collm. `compile_scoring`
    overrides whether the decoder's layers run compiled (default: as the run was trained)."""
    from .run_folder import ALLMREC, run_kind

    folder = Path(run_dir)
    dataset = _dataset(data)
    if run_kind(folder) == ALLMREC:
        from .next_item_experiment import load_allmrec

        return NextItemRecommender(load_allmrec(folder, dataset, device), dataset, folder)
    from .recommender import load_run

    run = load_run(folder, dataset, device=device)
    if compile_scoring is not None:
        run.model.compile_scoring = compile_scoring
    return CCFRecommender(run, dataset, folder)


def _dataset(data) -> CTRDataset:
    from .data import load_collm_split, resolve_data_dir
    from .data.dataset import CTRDataset

    if isinstance(data, CTRDataset):
        return data
    return load_collm_split(resolve_data_dir(data), max_history=DATA_HISTORY)


# -- histories ---------------------------------------------------------------------------------------

_ID = re.compile(r"-?\d+")


def parse_history(value, row: int | None = None) -> list[int] | None:
    """A history cell as a list of item ids: a list or array, or a string "[1, 2, 3]" or "1 2 3" (how a
    CSV file holds it). None or an empty cell means 'the user's history in the dataset'."""
    where = "" if row is None else f" (row {row})"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]")
        pieces = [p for p in re.split(r"[\s,;]+", text) if p]
        if not all(_ID.fullmatch(p) for p in pieces):
            raise CCFLLMError(f"history{where} must list item ids, as [1, 2, 3] or 1 2 3; got {value!r}.")
        return [int(p) for p in pieces]
    if isinstance(value, list | tuple | np.ndarray | pd.Series):
        ids = list(value)
        if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
            raise CCFLLMError(f"history{where} must hold integer item ids; got {ids[:5]!r}.")
        return [int(i) for i in ids]
    raise CCFLLMError(f"history{where} must be a list of item ids, not {type(value).__name__}.")


@dataclass
class UserRecords:
    """What the dataset says of each user, gathered once: liked items in time order, and every item
    they have a row for (what `exclude_seen` leaves out)."""

    liked: dict[int, list[int]]
    seen: dict[int, set[int]]

    @classmethod
    def of(cls, dataset: CTRDataset) -> UserRecords:
        frames = [split.frame()[["uid", "iid", "label", "timestamp"]] for split in dataset.splits.values()]
        rows = pd.concat(frames, ignore_index=True)
        # the order predict_rows gives a history: by time, ties by item id
        liked = rows[rows["label"] == 1].sort_values(["uid", "timestamp", "iid"], kind="stable")
        return cls(
            liked={int(u): g.tolist() for u, g in liked.groupby("uid")["iid"]},
            seen={int(u): set(g.tolist()) for u, g in rows.groupby("uid")["iid"]},
        )


# -- CCF-LLM and the baselines -----------------------------------------------------------------------


class CCFRecommender:
    """A loaded CCF-LLM run (or a baseline): score rows, recommend top-k, explain a score."""

    def __init__(self, run, dataset: CTRDataset, folder: Path):
        self.run = run  # recommender.Recommender: the model and its prompt builders
        self.dataset = dataset
        self.folder = folder
        self.records = UserRecords.of(dataset)

    # -- what the run is -----------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.run.config.method

    def info(self) -> dict:
        """The method, backbone, LLM and dataset of the run, and the metrics it recorded."""
        from .methods import METHODS, uses_backbone
        from .run_folder import read_metrics

        metrics = read_metrics(self.folder, missing_ok=True)
        config = self.run.config
        return {
            "run": str(self.folder),
            "method": config.method,
            "method_title": METHODS[config.method].title,
            "backbone": config.cf_model if uses_backbone(METHODS[config.method]) else None,
            "llm": config.llm,
            "llm_fingerprint": self.run.llm.fingerprint,
            "dataset": self.dataset.name,
            "domain": self.dataset.domain,
            "users": int(self.dataset.n_users - 1),
            "items": int(self.dataset.n_items - 1),
            "metrics": metrics.get("table", []),
        }

    def title(self, iid: int) -> str:
        titles = self.dataset.item_titles
        return str(titles[iid]).strip() if 0 < iid < len(titles) and isinstance(titles[iid], str) else ""

    def liked_history(self, uid: int) -> list[int]:
        """The user's liked items in the dataset, oldest first (empty for a user it does not hold)."""
        return list(self.records.liked.get(int(uid), []))

    def users(self) -> list[int]:
        """Users with at least one liked item, in id order."""
        return sorted(self.records.liked)

    # -- scoring ------------------------------------------------------------------------------------

    def score(self, rows: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
        """uid, iid, score, cf for each row, in order. Columns: uid, iid; optional history (list of item
        ids, or a string "[1, 2]" / "1 2"; missing: the user's history in the dataset) and title (needed
        for an item the dataset does not hold)."""
        from .prediction import predict_rows

        if not isinstance(rows, pd.DataFrame):
            raise CCFLLMError(f"score takes a DataFrame of rows, not {type(rows).__name__}.")
        frame = rows.reset_index(drop=True).copy()
        if "uid" in frame.columns and "iid" in frame.columns and len(frame):
            frame["history"] = self._histories(frame)
        if frame.empty:
            raise CCFLLMError("There are no rows to score.")
        return predict_rows(self.run, self.dataset, frame, progress=progress)

    def _histories(self, frame: pd.DataFrame) -> list[list[int]]:
        given = frame["history"] if "history" in frame.columns else [None] * len(frame)
        histories = []
        for row, (uid, value) in enumerate(zip(frame["uid"], given, strict=True)):
            history = parse_history(value, row)
            histories.append(self.liked_history(_user_id(uid)) if history is None else history)
        return histories

    def candidate_rows(
        self,
        uid: int,
        candidates=None,
        exclude_seen: bool = True,
        shortlist: int | None = None,
        history: list[int] | None = None,
    ) -> pd.DataFrame:
        """The rows `recommend` scores: (uid, candidate) for every titled item (or `candidates`), less
        the user's seen items; with `shortlist`, only the CF backbone's top `shortlist` of those."""
        uid = _user_id(uid)
        if candidates is None:
            pool = np.array([i for i in range(1, self.dataset.n_items) if self.title(i)], dtype=np.int64)
        else:
            pool = np.asarray(list(dict.fromkeys(int(i) for i in candidates)), dtype=np.int64)
            unknown = [int(i) for i in pool if not self.title(int(i))]
            if unknown:
                raise CCFLLMError(
                    f"Candidates {unknown[:5]} are not titled items of {self.dataset.name}; score new items "
                    "with score(), giving their title."
                )
        if exclude_seen:
            seen = self.records.seen.get(uid, set())
            pool = pool[~np.isin(pool, list(seen))] if seen else pool
        if shortlist is not None:
            pool = self._backbone_shortlist(uid, pool, shortlist, history)
        if len(pool) == 0:
            raise CCFLLMError(f"User {uid} has no candidate items left to recommend.")
        history = self.liked_history(uid) if history is None else list(history)
        return pd.DataFrame({"uid": uid, "iid": pool, "history": [history] * len(pool)})

    def recommend(
        self,
        uid: int,
        k: int = 10,
        candidates=None,
        exclude_seen: bool = True,
        shortlist: int | None = None,
        history: list[int] | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """The user's top `k` items by score: rank, iid, title, score, cf. Over every titled item of the
        dataset, or `candidates`; `exclude_seen` leaves out items the user has a row for; `shortlist=N`
        first keeps the CF backbone's top N (quick: the LLM then scores N rows, not the catalogue)."""
        if not isinstance(k, int | np.integer) or k < 1:
            raise CCFLLMError(f"k must be a positive integer, got {k!r}.")
        rows = self.candidate_rows(uid, candidates, exclude_seen, shortlist, history)
        return self.top_k(self.score_in_chunks(rows, progress), k)

    def score_in_chunks(self, rows: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
        """score(rows), a slice of rows at a time: one user's candidates share one prompt prefix, so the
        engine would batch them all at once, with a copy of the prefix's cache per row."""
        chunk = max(1, 2 * self.run.config.eval_batch_size)
        parts = [self.score(rows.iloc[s : s + chunk]) for s in range(0, len(rows), chunk)]
        return pd.concat(parts, ignore_index=True)

    def top_k(self, scored: pd.DataFrame, k: int) -> pd.DataFrame:
        """The `k` best-scored rows, ties by item id, with rank and title."""
        best = scored.sort_values(["score", "iid"], ascending=[False, True], kind="stable").head(k)
        best = best.reset_index(drop=True)
        best.insert(0, "rank", np.arange(1, len(best) + 1))
        best.insert(2, "title", [self.title(int(i)) for i in best["iid"]])
        return best[["rank", "iid", "title", "score", "cf"]]

    def _backbone_shortlist(
        self, uid: int, pool: np.ndarray, size: int, history: list[int] | None
    ) -> np.ndarray:
        if not isinstance(size, int | np.integer) or size < 1:
            raise CCFLLMError(f"shortlist must be a positive integer, got {size!r}.")
        backbone = self.backbone()
        if backbone is None:
            raise CCFLLMError(f"Method {self.method!r} has no CF backbone to shortlist with.")
        scores = self.backbone_scores(uid, pool, history)
        return pool[np.lexsort((pool, -scores))[:size]]

    def backbone(self):
        features = self.run.model.cf
        return getattr(features, "backbone", None)

    def backbone_scores(self, uid: int, items: np.ndarray, history: list[int] | None) -> np.ndarray:
        """sigmoid of the CF backbone's logit for (uid, item) per item. -> (len(items),)"""
        import torch

        from .data.dataset import pad_histories

        backbone = self.backbone()
        liked = self.liked_history(uid) if history is None else list(history)
        width = backbone.config.max_history
        device = next(backbone.parameters()).device
        uid_column = torch.full((len(items),), uid, dtype=torch.long, device=device)
        history_rows = torch.as_tensor(pad_histories([liked], width), device=device).expand(len(items), -1)
        with torch.no_grad():
            logits = backbone(uid_column, torch.as_tensor(items, device=device), history_rows)
        return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)

    def explain(self, uid: int, iid: int, history: list[int] | None = None) -> Explanation:
        """One row's score taken apart (explanation.explain): GATE's alpha per title token and per item,
        the score with CF and with the title text withheld, and the CF backbone's own score."""
        from .explanation import explain

        return explain(self, _user_id(uid), _item_id(iid), history)


# -- A-LLMRec -----------------------------------------------------------------------------------------


class NextItemRecommender:
    """A loaded A-LLMRec run: rank a user's candidate items by the LLM's scores of their titles."""

    method = "allmrec"

    def __init__(self, run, dataset: CTRDataset, folder: Path):
        self.run = run  # next_item_experiment.LoadedAllmrec
        self.dataset = dataset
        self.folder = folder

    def info(self) -> dict:
        from .run_folder import read_metrics

        metrics = read_metrics(self.folder, missing_ok=True)
        config = self.run.config
        return {
            "run": str(self.folder),
            "method": "allmrec",
            "method_title": config.variant,
            "backbone": "sasrec",
            "llm": config.llm,
            "dataset": self.dataset.name,
            "domain": self.dataset.domain,
            "metrics": metrics.get("table", []),
        }

    def score(self, rows, progress: bool = False):
        raise CCFLLMError(
            f"{self.folder} is an A-LLMRec run: it ranks candidates (rank(uid, candidates)); it does not "
            "score single (user, item) rows."
        )

    def rank(self, uid: int, candidates, history: list[int] | None = None) -> pd.DataFrame:
        """The candidates in the LLM's order: rank, iid, title, score (mean log-probability per token of
        the title). The history is `history`, else the user's liked items of the run's train part."""
        from .data.dataset import pad_histories
        from .data.next_item import NextItemSplit
        from .next_item_scoring import candidate_scores

        uid = _user_id(uid)
        items = [_item_id(i) for i in candidates]
        titles = self.run.task.item_titles
        untitled = [
            i for i in items if not (i < len(titles) and isinstance(titles[i], str) and titles[i].strip())
        ]
        if not items or untitled or len(set(items)) != len(items):
            raise CCFLLMError(
                "rank needs distinct titled candidate items"
                + (f"; {untitled[:5]} have no title in {self.dataset.name}." if untitled else ".")
            )
        liked = list(self.run.task.sequences.get(uid, [])) if history is None else list(history)
        split = NextItemSplit(
            "rank",
            uid=np.array([uid]),
            history=pad_histories([liked], self.run.config.sasrec_history),
            target=np.array([items[0]]),  # unused by the scores; the split wants one answer per row
            candidates=np.array([items]),
        )
        scores = candidate_scores(self.run.model, self.run.prompts, split, batch_size=1)[0]
        order = np.lexsort((np.array(items), -scores))
        ranked = pd.DataFrame({"iid": np.array(items)[order], "score": scores[order].astype(np.float64)})
        ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
        ranked.insert(2, "title", [str(titles[i]).strip() for i in ranked["iid"]])
        return ranked


def _user_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise CCFLLMError(f"A user id must be an integer, got {value!r}.")
    return int(value)


def _item_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise CCFLLMError(f"An item id must be an integer, got {value!r}.")
    return int(value)
