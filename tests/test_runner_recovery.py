"""Nothing accepted is lost: `kill -9` of the runner, then a restart on the same queue;
and scale-to-zero, where requests wait for the model instead of failing."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest
from conftest import (
    MODEL_NAME,
    WebhookReceiver,
    start_server,
    stop_server,
    wait_for_status,
)

SHORT = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
LONG = {**SHORT, "max_tokens": 480, "n": 8, "ignore_eos": True, "temperature": 1.0}
MIN_QUEUE_S = 10  # Baseten's smallest max_time_in_queue_seconds
FINAL = {"SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"}


def test_kill_9_then_restart_finishes_every_request(tmp_path, receiver: WebhookReceiver) -> None:
    log = tmp_path / "server.log"  # both runs share the state dir beside it
    first = start_server(log, "--workers", "1")
    enqueued_at = time.monotonic()

    def submit(model_input: dict, **fields) -> str:
        response = httpx.post(f"{first.base_url}/production/async_predict", timeout=30,
                              json={"model_input": model_input, **fields})
        assert response.status_code == 201, response.text
        return response.json()["request_id"]

    running = submit(LONG, webhook_endpoint=f"{receiver.url}/ok/crash/running")
    queued = [submit(SHORT, priority=1, webhook_endpoint=f"{receiver.url}/ok/crash/queued")
              for _ in range(3)]
    doomed = submit(SHORT, priority=2, max_time_in_queue_seconds=MIN_QUEUE_S,
                    webhook_endpoint=f"{receiver.url}/ok/crash/expired")
    wait_for_status(first.base_url, running, {"IN_PROGRESS"}, timeout=10)
    engine = psutil.Process(first.process.pid).children(recursive=True)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    for child in engine:  # the killed runner's EngineCore, started by this test
        if child.is_running():
            child.kill()
    # Let the low-priority request outlive its queue time while nobody serves.
    time.sleep(max(0.0, MIN_QUEUE_S + 1 - (time.monotonic() - enqueued_at)))

    second = start_server(log, "--workers", "1")
    try:
        assert wait_for_status(second.base_url, running, {"SUCCEEDED"}, 120)["errors"] == []
        for request_id in queued:
            assert wait_for_status(second.base_url, request_id, FINAL, 60)["status"] == \
                "SUCCEEDED"
        expired = wait_for_status(second.base_url, doomed, FINAL, 60)
        assert expired["status"] == "EXPIRED"
        assert expired["errors"][0]["code"] == "EXPIRED"
        assert len(receiver.wait_for(1, "/ok/crash/running")) >= 1
        assert len(receiver.wait_for(3, "/ok/crash/queued")) == 3
        assert len(receiver.wait_for(1, "/ok/crash/expired")) == 1
        assert "queued again" in second.log()
    finally:
        stop_server(second)


@pytest.fixture
def sleepy(tmp_path):
    srv = start_server(tmp_path / "server.log", "--scale-to-zero", "2")
    yield srv
    stop_server(srv)


def _ready(base_url: str) -> int:
    return httpx.get(f"{base_url}/v1/models/model", timeout=10).status_code


def _wait_ready(base_url: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _ready(base_url) != status:
        assert time.monotonic() < deadline, f"readiness never became {status}"
        time.sleep(0.2)


def test_scale_to_zero_then_requests_and_wake_bring_it_back(sleepy) -> None:
    base = sleepy.base_url
    _wait_ready(base, 503, timeout=15)  # idle for 2 s: unloaded, and readiness says so
    assert httpx.get(f"{base}/production/async_queue_status").status_code == 200
    started = time.monotonic()
    response = httpx.post(f"{base}/production/predict", json=SHORT, timeout=120)
    assert response.status_code == 200, response.text  # it waited for the model
    assert time.monotonic() - started > 1  # ... which really was loading
    _wait_ready(base, 503, timeout=15)
    assert httpx.post(f"{base}/production/wake", timeout=10).status_code == 202
    _wait_ready(base, 200, timeout=120)
