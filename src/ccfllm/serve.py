"""`ccfllm serve`: a loaded run behind HTTP (FastAPI), and the web page at `/`.

One model is loaded once and runs on one worker thread (torch modules are not safe to call from
several threads at once). Concurrent /score and /recommend requests are gathered into shared engine
calls: the first request waits at most `max_wait_s` for others, up to `max_batch_rows` rows in all,
then their rows are scored together and each request gets its own rows back (`MicroBatcher`). The
engine batches by prompt prefix, so rows of many requests fill its batches where one request's rows
alone would not.

Errors: a request the models cannot parse (wrong types, missing fields) is 422; an id the run cannot
score (an unknown item without a title, a user with no candidates left) 422; a body over `max_body_bytes`
or more than `max_rows` rows 413. Every error answers {"error": "<one line>"}. OpenAPI docs: /docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CCFLLMError

# at module level: FastAPI resolves the endpoints' annotations (strings here) from this module's names
from .serve_models import ExplainRequest, RankRequest, RecommendRequest, ScoreRequest

WEB_FOLDER = Path(__file__).parent / "web"


@dataclass
class ServiceLimits:
    max_body_bytes: int = 1 << 20  # 1 MiB: some 20,000 rows of JSON
    max_rows: int = 2048  # rows of one /score request
    max_batch_rows: int = 256  # rows gathered into one engine call
    max_wait_s: float = 0.01  # how long the first request of a batch waits for others
    max_k: int = 100
    max_candidates: int = 10_000


@dataclass
class _Pending:
    frame: pd.DataFrame
    future: asyncio.Future
    alone: bool  # new items with titles: their titles must not meet another request's


@dataclass
class BatchStats:
    requests: int = 0
    rows: int = 0
    engine_calls: int = 0
    sizes: list[int] = field(default_factory=list)  # rows per engine call, the last 1,000


class MicroBatcher:
    """Gathers the rows of concurrent requests into shared calls of `score` (on `executor`)."""

    def __init__(self, score, executor: ThreadPoolExecutor, limits: ServiceLimits):
        self.score, self.executor, self.limits = score, executor, limits
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.stats = BatchStats()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def submit(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The scored rows of `frame`, in its order, once a batch holding them has run."""
        future = asyncio.get_running_loop().create_future()
        alone = "title" in frame.columns and frame["title"].notna().any()
        await self.queue.put(_Pending(frame.reset_index(drop=True), future, bool(alone)))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            await self._score(batch)

    async def _gather(self) -> list[_Pending]:
        """The first waiting request, and those that arrive within max_wait_s while rows remain."""
        first = await self.queue.get()
        batch, rows = [first], len(first.frame)
        if first.alone:
            return batch
        deadline = time.monotonic() + self.limits.max_wait_s
        while rows < self.limits.max_batch_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                pending = await asyncio.wait_for(self.queue.get(), remaining)
            except TimeoutError:
                break
            if pending.alone:  # runs on its own, next
                await self._score([pending])
                continue
            batch.append(pending)
            rows += len(pending.frame)
        return batch

    async def _score(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        combined = pd.concat([p.frame for p in batch], ignore_index=True)
        try:
            scored = await loop.run_in_executor(self.executor, self.score, combined)
        except CCFLLMError:
            if len(batch) == 1:
                _settle(batch[0].future, error=_current_error())
                return
            for pending in batch:  # one bad request must not fail the others: each alone
                await self._score([pending])
            return
        except Exception as exc:  # noqa: BLE001 - handed to the requests, which answer 500
            for pending in batch:
                _settle(pending.future, error=exc)
            return
        self._count(batch, len(combined))
        start = 0
        for pending in batch:
            end = start + len(pending.frame)
            _settle(pending.future, result=scored.iloc[start:end].reset_index(drop=True))
            start = end

    def _count(self, batch: list[_Pending], rows: int) -> None:
        self.stats.requests += len(batch)
        self.stats.rows += rows
        self.stats.engine_calls += 1
        self.stats.sizes = [*self.stats.sizes[-999:], rows]


def _current_error() -> BaseException:
    import sys

    return sys.exc_info()[1]


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# -- the app ------------------------------------------------------------------------------------------


def create_app(recommender, limits: ServiceLimits | None = None):
    """The FastAPI app serving `recommender` (what ccfllm.load returns)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from . import api

    limits = limits or ServiceLimits()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccfllm-model")
    is_ctr = isinstance(recommender, api.CCFRecommender)
    batcher = MicroBatcher(recommender.score_in_chunks if is_ctr else recommender.score, executor, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="ccfllm",
        summary="A trained CCF-LLM run: score rows, recommend, explain a score.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.recommender, app.state.limits = batcher, recommender, limits
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.mount("/static", StaticFiles(directory=WEB_FOLDER), name="static")

    @app.exception_handler(CCFLLMError)
    async def refused(request: Request, exc: CCFLLMError):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc.errors())}, status_code=422)

    async def in_model_thread(function, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    def needs_ctr_run(what: str) -> None:
        if not is_ctr:
            raise CCFLLMError(f"This is an A-LLMRec run: it answers /rank, not {what}.")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_FOLDER / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        stats = batcher.stats
        return {
            "status": "ok",
            "requests": stats.requests,
            "rows": stats.rows,
            "engine_calls": stats.engine_calls,
        }

    @app.get("/info")
    async def info():
        return {**recommender.info(), "limits": vars(limits)}

    @app.get("/users")
    async def users(limit: int = 200):
        needs_ctr_run("/users")
        return {"users": recommender.users()[: max(0, min(limit, 10_000))]}

    @app.post("/score")
    async def score(request: ScoreRequest):
        needs_ctr_run("/score")
        if len(request.rows) > limits.max_rows:
            return _too_large(f"{len(request.rows)} rows in one request; at most {limits.max_rows}.")
        frame = pd.DataFrame([row.model_dump() for row in request.rows])
        if frame["title"].isna().all():
            frame = frame.drop(columns="title")
        scored = await batcher.submit(frame)
        return {"scores": _records(scored)}

    @app.post("/recommend")
    async def recommend(request: RecommendRequest):
        needs_ctr_run("/recommend")
        if request.k > limits.max_k or len(request.candidates or []) > limits.max_candidates:
            return _too_large(f"k at most {limits.max_k}, candidates at most {limits.max_candidates}.")
        rows = await in_model_thread(
            recommender.candidate_rows,
            request.uid,
            request.candidates,
            request.exclude_seen,
            request.shortlist,
            request.history,
        )
        scored = await batcher.submit(rows)
        top = recommender.top_k(scored, request.k)
        history = recommender.liked_history(request.uid) if request.history is None else request.history
        return {
            "uid": request.uid,
            "history": [{"iid": int(i), "title": recommender.title(int(i))} for i in history],
            "candidates": len(rows),
            "items": _records(top),
        }

    @app.post("/explain")
    async def explain(request: ExplainRequest):
        needs_ctr_run("/explain")
        explanation = await in_model_thread(recommender.explain, request.uid, request.iid, request.history)
        return {**explanation.to_dict(), "title": recommender.title(request.iid)}

    @app.post("/rank")
    async def rank(request: RankRequest):
        if is_ctr:
            raise CCFLLMError("This is a CCF-LLM run: /rank answers A-LLMRec runs; use /recommend.")
        ranked = await in_model_thread(recommender.rank, request.uid, request.candidates, request.history)
        return {"uid": request.uid, "items": _records(ranked)}

    return app


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: numpy scalars as Python numbers."""
    out = []
    for record in frame.to_dict(orient="records"):
        out.append({k: v.item() if isinstance(v, np.generic) else v for k, v in record.items()})
    return out


def _too_large(message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"Request too large: {message}"}, status_code=413)


def _validation_message(errors) -> str:
    """pydantic's errors as one line: `rows.0.uid: Input should be a valid integer; ...`."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes answers 413, by its Content-Length when it
    gives one, else as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        import json

        body = json.dumps({"error": f"Request too large: the body may hold at most {self.limit} bytes."})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


class _BodyTooLarge(Exception):
    pass


def serve(recommender, host: str = "127.0.0.1", port: int = 8000, limits: ServiceLimits | None = None):
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(recommender, limits), host=host, port=port, log_level="info")
