"""Limits, auth and the async queue's semantics on a runner with compressed limits.

This module's runner has an API key, one async worker (so queue order is observable), a
1 s sync timeout and a 1 s async run time: a long generation (3,000 tokens, n=4) runs past
both, a short one (4 tokens) stays well inside. It does not tell the model its budget
(`forward_budget` off), as with a model that knows nothing of budgets: so its limits are
the runner's own, Baseten's last resort (test_budget.py tests the model keeping inside them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from conftest import (
    MODEL_NAME,
    Server,
    WebhookReceiver,
    start_server,
    stop_server_soon,
    wait_for_status,
)
from openai import APIError, AuthenticationError, OpenAI
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

KEY = "test-key-123"
AUTH = {"Authorization": f"Api-Key {KEY}"}
SHORT = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
# 3,000 decoding steps (n sequences share a step, so only length makes it long): seconds on
# any machine, far past the 1 s limits. The server's context is raised to hold it.
LONG = {**SHORT, "max_tokens": 3000, "n": 4, "ignore_eos": True, "temperature": 1.0}
LONG_CONTEXT = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "4096"}
MB = 1000 * 1000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("limited") / "server.log", "--workers", "1",
        "--sync-timeout", "1", api_key=KEY,
        extra_env={**LONG_CONTEXT, "TRUSS_LLM_RUNNER_ASYNC_RUN_TIMEOUT_S": "1",
                   "TRUSS_LLM_RUNNER_FORWARD_BUDGET": "false",
                   "TRUSS_LLM_RUNNER_WEBHOOK_ATTEMPTS": "2",
                   "TRUSS_LLM_RUNNER_WEBHOOK_BACKOFF_S": "0.1"})
    yield srv
    stop_server_soon(srv)


@pytest.fixture
def http(limited: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, headers=AUTH, timeout=60) as session:
        yield session


def enqueue(http: httpx.Client, model_input: dict, **fields) -> str:
    response = http.post("/production/async_predict", json={"model_input": model_input,
                                                             **fields})
    assert response.status_code == 201, response.text
    return response.json()["request_id"]


def status(limited: Server, request_id: str, statuses: set[str], timeout: float = 60) -> dict:
    return wait_for_status(limited.base_url, request_id, statuses, timeout, headers=AUTH)


# -- auth ------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Api-Key wrong"},
                                     {"Authorization": KEY}, {"Authorization": "Basic x"}])
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/production/predict"), ("POST", "/production/async_predict"),
    ("GET", "/production/async_queue_status"), ("POST", "/wake"),
    ("GET", "/async_request/abc"), ("GET", "/v1/models/model"),
    ("POST", "/v1/chat/completions")])
def test_every_route_requires_the_key(limited: Server, headers: dict, method: str,
                                      path: str) -> None:
    response = httpx.request(method, f"{limited.base_url}{path}", headers=headers, json=SHORT)
    assert response.status_code == 401
    assert "Api-Key" in json.dumps(response.json())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Api-Key wrong"}])
def test_websockets_need_the_key_too(limited: Server, headers: dict) -> None:
    url = limited.base_url.replace("http://", "ws://") + "/v1/websocket"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=headers, open_timeout=10).close()
    assert refused.value.response.status_code == 403


def test_api_key_and_bearer_are_accepted(limited: Server, http: httpx.Client) -> None:
    assert http.post("/production/predict", json=SHORT).status_code == 200
    client = OpenAI(base_url=f"{limited.base_url}/environments/production/sync/v1",
                    api_key=KEY, max_retries=0)
    assert client.chat.completions.create(**SHORT).usage.completion_tokens == 4
    wrong = OpenAI(base_url=f"{limited.base_url}/environments/production/sync/v1",
                   api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        wrong.chat.completions.create(**SHORT)


# -- sync limits -----------------------------------------------------------------------------
def test_sync_timeout_is_a_504_and_aborts_the_work(limited: Server, http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.post("/production/predict", json=LONG)
    assert response.status_code == 504
    assert "sync timeout" in response.json()["error"]
    assert time.monotonic() - started < 5
    openai_route = http.post("/environments/production/sync/v1/chat/completions", json=LONG)
    assert openai_route.status_code == 504
    assert openai_route.json()["error"]["code"] == 504
    deadline = time.monotonic() + 10
    while limited.unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert limited.unfinished_requests() == 0


def test_sync_timeout_mid_stream_ends_with_an_error_event(limited: Server,
                                                        http: httpx.Client) -> None:
    """A stream the 504 cuts short must not look complete: an SSE error, no [DONE]."""
    body = {**LONG, "stream": True}
    for path in ("/production/predict", "/environments/production/sync/v1/chat/completions"):
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] != "data: [DONE]"
        error = json.loads(events[-1][len("data: "):])["error"]
        assert error["code"] == 504 and "sync timeout" in error["message"]
    client = OpenAI(base_url=f"{limited.base_url}/environments/production/sync/v1",
                    api_key=KEY, max_retries=0)
    with pytest.raises(APIError, match="sync timeout"):
        for _ in client.chat.completions.create(
                model=MODEL_NAME, messages=LONG["messages"], max_tokens=LONG["max_tokens"],
                n=body["n"], temperature=1.0, stream=True, extra_body={"ignore_eos": True}):
            pass


def _rss(server: Server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_100_mb_is_a_413_without_buffering_it(limited: Server, chunked: bool) -> None:
    size = 101 * MB
    chunk = b"x" * (1 << 20)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < size:
            piece = chunk[: size - sent]
            sent += len(piece)
            yield piece

    headers = dict(AUTH)
    if not chunked:
        headers["content-length"] = str(size)
    before = _rss(limited)
    response = httpx.post(f"{limited.base_url}/production/predict", content=body(),
                          headers=headers, timeout=120)
    grown = _rss(limited) - before
    assert response.status_code == 413
    assert "100,000,000 byte limit" in response.json()["error"]
    assert grown < 30 * MB, f"runner grew by {grown / MB:.0f} MB"


# -- async queue semantics ------------------------------------------------------------------
def test_priority_order_with_one_worker(limited: Server, http: httpx.Client,
                                        receiver: WebhookReceiver) -> None:
    blocker = enqueue(http, LONG)  # occupies the single worker for its 1 s run time
    status(limited, blocker, {"IN_PROGRESS", "FAILED"})
    for priority in (2, 1, 0):
        enqueue(http, SHORT, priority=priority,
                webhook_endpoint=f"{receiver.url}/ok/prio/{priority}")
    deliveries = receiver.wait_for(3, "/ok/prio/")
    assert [d.path for d in deliveries] == ["/ok/prio/0", "/ok/prio/1", "/ok/prio/2"]
    record = status(limited, blocker, {"FAILED"})
    assert record["errors"][0]["code"] == "MODEL_PREDICT_TIMEOUT"


def test_failures_are_retried_then_failed(limited: Server, http: httpx.Client,
                                          receiver: WebhookReceiver) -> None:
    started = time.monotonic()
    request_id = enqueue(http, LONG, webhook_endpoint=f"{receiver.url}/ok/retried",
                         inference_retry_config={"max_attempts": 3, "initial_delay_ms": 100,
                                                 "max_delay_ms": 200})
    record = status(limited, request_id, {"FAILED"})
    assert time.monotonic() - started >= 3.0  # three attempts of 1 s each
    assert record["errors"] == [{"code": "MODEL_PREDICT_TIMEOUT",
                                 "message": "The model did not finish within 1 s."}]
    [delivery] = receiver.wait_for(1, "/ok/retried")
    assert json.loads(delivery.body)["data"] is None


def test_delete_cancels_a_queued_request(limited: Server, http: httpx.Client,
                                         receiver: WebhookReceiver) -> None:
    blocker = enqueue(http, LONG)
    status(limited, blocker, {"IN_PROGRESS", "FAILED"})
    queued = enqueue(http, SHORT, webhook_endpoint=f"{receiver.url}/ok/canceled")
    response = http.delete(f"/async_request/{queued}")
    assert response.status_code == 200, response.text
    record = status(limited, queued, {"CANCELED"})
    assert record["webhook_status"] == "CANCELED"
    again = http.delete(f"/async_request/{queued}")
    assert again.status_code == 400 and "CANCELED" in again.json()["error"]
    status(limited, blocker, {"FAILED"})
    assert receiver.wait_for(1, "/ok/canceled", timeout=2) == []


def test_queue_status_counts(limited: Server, http: httpx.Client) -> None:
    blocker = enqueue(http, LONG)
    status(limited, blocker, {"IN_PROGRESS", "FAILED"})
    waiting = [enqueue(http, SHORT, priority=2) for _ in range(3)]
    body = http.get("/production/async_queue_status").json()
    assert body["num_queued_requests"] >= 2 and body["num_in_progress_requests"] <= 1
    for request_id in waiting:
        status(limited, request_id, {"SUCCEEDED"})
    body = http.get("/async_queue_status").json()
    assert body["num_queued_requests"] == 0 and body["num_in_progress_requests"] == 0
