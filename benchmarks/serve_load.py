"""`ccfllm serve` under load: throughput and latency, micro-batched against one request at a time, and
against calling `.score` in-process; no response lost or given to the wrong request.

    .venv/bin/python benchmarks/serve_load.py --run /tmp/runs/default
    .venv/bin/python benchmarks/serve_load.py --run RUN --data DIR --requests 400 --clients 32

The same seeded requests (each a few (user, item) rows of the test split) are sent by `--clients`
concurrent clients (threads, one HTTP connection per request, loopback) to a real `ccfllm serve`
process, started twice: micro-batched (`--max-batch-rows 256`, the default) and one request per engine
call (`--max-batch-rows 1`). In-process, the same requests are scored one `.score` call each, one after
another, and all at once in a single call. Each answer is checked: status 200, its rows in its
request's order, its scores those of the in-process call (to --tolerance). Prints one table; writes
the figures to --out as JSON. Timings are wall-clock on this machine as it is loaded when it runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    args = _arguments()
    import torch

    import ccfllm

    if args.threads:
        torch.set_num_threads(args.threads)

    model = ccfllm.load(args.run, data=args.data, device=args.device)
    requests = _requests(model.dataset, args.requests, args.rows_per_request, args.seed)
    every_row = pd.DataFrame([row for rows in requests for row in rows])
    model.score(every_row.head(8))  # warm: compiled layers, caches
    results = {"in-process, one call per request": _in_process_each(model, requests)}
    started = time.perf_counter()
    expected = model.score(every_row)
    results["in-process, all rows in one call"] = {
        "seconds": time.perf_counter() - started,
        "rows_per_s": len(every_row) / (time.perf_counter() - started),
    }
    expected_by_request = np.split(expected["score"].to_numpy(), np.cumsum([len(r) for r in requests])[:-1])
    for label, batch_rows in (("server, micro-batched", 256), ("server, one request at a time", 1)):
        results[label] = _against_server(args, batch_rows, requests, expected_by_request)
    results["setup"] = {
        "run": str(args.run),
        "requests": len(requests),
        "rows": len(every_row),
        "clients": args.clients,
        "max_wait_ms": args.max_wait_ms,
        "load_average_at_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": args.threads or "torch's default",
    }
    _print(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", default=None, help="Dataset folder (default: as ccfllm finds it).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16, help="Requests in flight at most.")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--tolerance", type=float, default=2e-3, help="Largest score difference allowed.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, in-process and served.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the figures.")
    return parser.parse_args()


def _requests(dataset, count: int, size: int, seed: int) -> list[list[dict]]:
    """`count` requests of `size` rows each, drawn from the test split with a seed."""
    test = dataset.test
    chosen = np.random.default_rng(seed).choice(
        len(test), size=count * size, replace=len(test) < count * size
    )
    rows = [{"uid": int(test.uid[r]), "iid": int(test.iid[r])} for r in chosen]
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _in_process_each(model, requests) -> dict:
    latencies = []
    started = time.perf_counter()
    for rows in requests:
        began = time.perf_counter()
        model.score(pd.DataFrame(rows))
        latencies.append(time.perf_counter() - began)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows_per_s": sum(map(len, requests)) / seconds, **_percentiles(latencies)}


def _against_server(args, batch_rows: int, requests, expected) -> dict:
    port = _free_port()
    command = [
        sys.executable, "-m", "ccfllm.cli", "serve", "--run", str(args.run), "--port", str(port),
        "--device", args.device, "--max-batch-rows", str(batch_rows), "--max-wait-ms", str(args.max_wait_ms),
    ]  # fmt: skip
    if args.data:
        command += ["--data", str(args.data)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_up(port, server)
        _post(port, "/score", {"rows": requests[0]})  # warm: the server's compiled layers
        before = json.loads(_get(port, "/health"))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as clients:
            answers = list(clients.map(lambda rows: _timed_post(port, rows), requests))
        seconds = time.perf_counter() - started
        after = json.loads(_get(port, "/health"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    checked = _check(requests, answers, expected, args.tolerance)
    calls = after["engine_calls"] - before["engine_calls"]
    return {
        "seconds": seconds,
        "rows_per_s": sum(map(len, requests)) / seconds,
        "requests_per_s": len(requests) / seconds,
        "engine_calls": calls,
        "requests_per_engine_call": len(requests) / max(calls, 1),
        **_percentiles([latency for _, _, latency in answers]),
        **checked,
    }


def _check(requests, answers, expected, tolerance: float) -> dict:
    lost = sum(status != 200 for status, _, _ in answers)
    misrouted, largest = 0, 0.0
    for rows, (status, body, _), scores in zip(requests, answers, expected, strict=True):
        if status != 200:
            continue
        got = body["scores"]
        if [(r["uid"], r["iid"]) for r in got] != [(r["uid"], r["iid"]) for r in rows]:
            misrouted += 1
            continue
        difference = float(np.abs(np.array([r["score"] for r in got]) - scores).max())
        largest = max(largest, difference)
        misrouted += difference > tolerance
    return {"lost": lost, "misrouted": misrouted, "largest_score_difference": largest}


def _percentiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(port: int, server: subprocess.Popen, limit_s: float = 900) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            _get(port, "/health")
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def _timed_post(port: int, rows: list[dict]) -> tuple[int, dict, float]:
    began = time.perf_counter()
    status, body = _post(port, "/score", {"rows": rows})
    return status, body, time.perf_counter() - began


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def _print(results: dict) -> None:
    setup = results["setup"]
    print(
        f"\n{setup['requests']} requests of {setup['rows'] // setup['requests']} rows, {setup['clients']} "
        f"clients, {setup['cpus']} CPUs, torch threads {setup['torch_threads']}, load average at the end "
        f"{setup['load_average_at_end']}"
    )
    print("| how | rows/s | p50 ms | p99 ms | requests per engine call | lost | misrouted |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        if name == "setup":
            continue
        cells = [
            f"{row['rows_per_s']:.1f}",
            f"{row['p50_ms']:.0f}" if "p50_ms" in row else "-",
            f"{row['p99_ms']:.0f}" if "p99_ms" in row else "-",
            f"{row['requests_per_engine_call']:.1f}" if "engine_calls" in row else "-",
            str(row.get("lost", "-")),
            str(row.get("misrouted", "-")),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
