"""`ccfllm serve`: the FastAPI app through its test client, once over a real socket, and the page in
headless Chromium; on the tiny run built in code (conftest.tiny_run)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

import ccfllm  # noqa: E402
from ccfllm.serve import ServiceLimits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_run, tiny_dataset):
    return ccfllm.load(tiny_run, data=tiny_dataset, device="cpu")


@pytest.fixture(scope="module")
def client(model):
    limits = ServiceLimits(max_body_bytes=4096, max_rows=20, max_k=10)
    with TestClient(create_app(model, limits)) as client:
        yield client


def test_health_info_and_the_openapi_docs(client, tiny_run):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert (info["method"], info["backbone"], info["dataset"]) == ("ccf-llm", "mf", "tiny")
    assert info["metrics"][-1]["model"] == "CCF-LLM after stage fusion"
    assert "/score" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_score_recommend_and_explain_answer_as_the_api(client, model):
    rows = [{"uid": 1, "iid": 2}, {"uid": 3, "iid": 5, "history": [4, 6]}]
    answer = client.post("/score", json={"rows": rows}).json()["scores"]
    expected = model.score(pd.DataFrame({"uid": [1, 3], "iid": [2, 5], "history": [None, [4, 6]]}))
    assert [(r["uid"], r["iid"], r["cf"]) for r in answer] == list(
        zip(expected["uid"], expected["iid"], expected["cf"], strict=True)
    )
    np.testing.assert_allclose([r["score"] for r in answer], expected["score"], atol=1e-6)

    top = client.post("/recommend", json={"uid": 2, "k": 3}).json()
    assert [item["iid"] for item in top["items"]] == model.recommend(2, k=3)["iid"].tolist()
    assert [h["iid"] for h in top["history"]] == model.liked_history(2)

    explained = client.post("/explain", json={"uid": 1, "iid": 2}).json()
    direct = model.explain(1, 2)
    assert explained["score_without_cf"] == pytest.approx(direct.score_without_cf)
    assert [t["position"] for t in explained["tokens"]] == [t["position"] for t in direct.tokens]

    new_item = client.post("/score", json={"rows": [{"uid": 1, "iid": 60, "title": "Movie 7 (1987)"}]})
    assert new_item.status_code == 200 and new_item.json()["scores"][0]["cf"] == "user only"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/score", {"rows": [{"uid": "one", "iid": 2}]}, 422, "rows.0.uid"),
        ("/score", {"rows": [{"uid": 1.5, "iid": 2}]}, 422, "valid integer"),
        ("/score", {"rows": [{"uid": 1, "iid": 2, "colour": "red"}]}, 422, "rows.0.colour"),
        ("/score", {"rows": []}, 422, "rows"),
        ("/score", {"rows": [{"uid": 1, "iid": 500}]}, 422, "add a `title`"),
        ("/score", {"rows": [{"uid": 1, "iid": 2}] * 21}, 413, "at most 20"),
        ("/score", {"rows": [{"uid": 1, "iid": 2, "title": "x" * 5000}]}, 413, "at most 4096 bytes"),
        ("/recommend", {"uid": 1, "k": 11}, 413, "k at most 10"),
        ("/recommend", {"uid": 1, "k": 0}, 422, "k"),
        ("/recommend", {"uid": 1, "candidates": [999]}, 422, "not titled items"),
        ("/explain", {"uid": 1}, 422, "iid: Field required"),
        ("/explain", {"uid": 1, "iid": 999}, 422, "add a `title`"),
        ("/rank", {"uid": 1, "candidates": [2]}, 422, "use /recommend"),
    ],
)
def test_every_error_class_is_a_4xx_with_a_message(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_body_that_is_not_json_is_a_422_with_a_message(client):
    response = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"].startswith("Invalid request")


# -- over a real socket --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(model):
    """uvicorn serving the tiny run on a free loopback port, in a thread; stopped at the end."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not running.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"127.0.0.1:{port}", running
    running.should_exit = True
    thread.join(timeout=30)


def _post(address: str, path: str, body: dict) -> tuple[int, dict]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_200_concurrent_requests_over_a_socket_each_get_their_own_rows(server, model, tiny_dataset):
    address, _ = server
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(200):
        size = int(rng.integers(1, 4))
        uid = rng.integers(1, tiny_dataset.n_users, size)
        iid = rng.integers(1, tiny_dataset.n_items, size)
        requests.append([{"uid": int(u), "iid": int(i)} for u, i in zip(uid, iid, strict=True)])
    with ThreadPoolExecutor(max_workers=32) as clients:  # bounded: at most 32 requests in flight
        answers = list(clients.map(lambda rows: _post(address, "/score", {"rows": rows}), requests))
    assert [status for status, _ in answers] == [200] * 200
    every_row = pd.DataFrame([row for rows in requests for row in rows])
    expected = model.score(every_row)
    start = 0
    for rows, (_, answer) in zip(requests, answers, strict=True):
        mine = expected.iloc[start : start + len(rows)]
        start += len(rows)
        assert [(r["uid"], r["iid"]) for r in answer["scores"]] == [(r["uid"], r["iid"]) for r in rows]
        np.testing.assert_allclose([r["score"] for r in answer["scores"]], mine["score"], atol=1e-5)
    health = json.loads(_get(address, "/health"))
    assert health["requests"] >= 200
    # the requests were gathered into shared engine calls, not run one by one
    assert health["engine_calls"] < health["requests"]
    status, refused = _post(address, "/score", {"rows": [{"uid": "x", "iid": 1}]})
    assert status == 422 and "rows.0.uid" in refused["error"]


def _get(address: str, path: str) -> str:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


# -- the page, in headless Chromium ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_flags(profile) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_shows_a_users_recommendations_and_an_explanation(server, model, tmp_path):
    address, _ = server
    url = f"http://{address}/?uid=2"
    command = [
        CHROMIUM,
        *chromium_flags(tmp_path / "profile"),
        "--virtual-time-budget=60000",
        "--dump-dom",
        url,
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    assert 'data-state="explained"' in dom, dom[-2000:]
    top = model.recommend(2, k=10, shortlist=50)
    for iid in top["iid"]:
        assert f'data-iid="{iid}"' in dom  # each recommendation is a row of the table
    assert f'of "{top["title"][0]}"' in dom  # the first one is explained
    assert dom.count('class="token"') == len(model.explain(2, int(top["iid"][0])).tokens)
    assert dom.count("<rect") == 4  # score, CF withheld, text withheld, the backbone alone
    for title in [model.title(i) for i in model.liked_history(2)]:
        assert f"<li>{title}</li>" in dom
