"""The runner's safety defaults: no empty API key, no open runner off loopback, no secret in
a log line."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pydantic
import pytest
from conftest import (
    MODEL_NAME,
    REPO,
    Server,
    WebhookReceiver,
    free_port,
    start_server,
    stop_server_soon,
    wait_for_status,
)
from truss_llm.runner.settings import RunnerSettings
from truss_llm.runner.webhooks import deliver, webhook_policy

START_TIMEOUT_S = 120


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`truss-llm serve` that must refuse to start (a bounded wait, nothing bound)."""
    return subprocess.run(
        [sys.executable, "-m", "truss_llm", "serve", "--port", str(free_port()), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)


def test_an_empty_api_key_is_refused_at_start_up() -> None:
    refused = serve("--api-key", "")
    assert refused.returncode == 2
    assert "API key is empty" in refused.stderr
    refused = serve(env={**os.environ, "TRUSS_LLM_RUNNER_API_KEY": " "})
    assert refused.returncode == 2
    assert "API key is empty" in refused.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "model.example.com"])
def test_an_open_runner_binds_loopback_only(host: str) -> None:
    # Checked on the settings, never by binding: tests listen on 127.0.0.1 only.
    with pytest.raises(pydantic.ValidationError, match="without an API key"):
        RunnerSettings(host=host)
    assert RunnerSettings(host=host, api_key="k").host == host
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert RunnerSettings(host=loopback).api_key is None


def test_a_webhook_token_never_reaches_the_log(server: Server, receiver: WebhookReceiver
                                                ) -> None:
    token = "whtok-5f1c9e0b7d"
    response = httpx.post(f"{server.base_url}/production/async_predict", json={
        "model_input": {"model": MODEL_NAME, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]},
        "webhook_endpoint": f"{receiver.url}/logged?token={token}"}, timeout=30)
    assert response.status_code == 201
    wait_for_status(server.base_url, response.json()["request_id"], {"SUCCEEDED"})
    (delivery,) = receiver.wait_for(1, "/logged")
    assert token in delivery.path  # it was really sent...
    deadline = time.monotonic() + 30  # the runner logs once the receiver has answered
    while "/logged" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert "/logged" in log  # ...and the delivery really logged...
    assert token not in log  # ...without it


def test_httpx_request_lines_lose_their_query(receiver: WebhookReceiver,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """httpx logs every request's full URL at INFO; with the webhook module loaded (the
    runner loads it), the query string never reaches a handler."""
    import truss_llm.runner.webhooks  # noqa: F401  (installs the redaction)

    token = "qstok-93ab01"
    with caplog.at_level(logging.INFO, logger="httpx"):
        httpx.post(f"{receiver.url}/direct?token={token}", content=b"{}", timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("/direct?<redacted>" in line for line in lines), lines
    assert token not in caplog.text


# -- webhooks under the default policy ------------------------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A runner with every safety setting at its default."""
    srv = start_server(tmp_path_factory.mktemp("strict") / "server.log",
                       loopback_webhooks=False)
    yield srv
    stop_server_soon(srv)


def _async_predict(server: Server, webhook: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/production/async_predict", json={
        "model_input": {"model": MODEL_NAME, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]},
        "webhook_endpoint": webhook}, timeout=30)


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "10.1.2.3", "[::1]",
                                  "2130706433"])
def test_a_webhook_to_a_private_address_is_refused_at_enqueue(strict: Server,
                                                              host: str) -> None:
    response = _async_predict(strict, f"http://{host}:8080/hook?token=t0k")
    assert response.status_code == 400
    message = response.json()["error"]
    assert "webhook_endpoint" in message and "t0k" not in message


def test_a_webhook_host_resolving_to_loopback_is_refused_at_delivery(
        strict: Server, receiver: WebhookReceiver) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    response = _async_predict(strict, f"http://localhost:{port}/strict")
    assert response.status_code == 201  # a name: judged when it is resolved, at delivery
    request_id = response.json()["request_id"]
    wait_for_status(strict.base_url, request_id, {"SUCCEEDED", "WEBHOOK_FAILED"})
    deadline = time.monotonic() + 30
    record: dict = {}
    while time.monotonic() < deadline:
        record = httpx.get(f"{strict.base_url}/async_request/{request_id}", timeout=10).json()
        if record["webhook_status"] != "PENDING":
            break
        time.sleep(0.1)
    assert record["webhook_status"] == "FAILED"
    assert receiver.wait_for(1, "/strict", timeout=1) == []
    assert "webhook to http://localhost" in strict.log() and "refused" in strict.log()


def test_webhook_policy_pins_and_refuses_before_dialling(receiver: WebhookReceiver) -> None:
    """A name whose answers include a private address is refused as a whole; an allowed
    network is dialled at the address checked, whatever the name."""

    async def private_and_public(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    port = receiver.url.rsplit(":", 1)[1]
    default = webhook_policy()
    allowed = webhook_policy(("127.0.0.1/32",))
    assert not asyncio.run(deliver(f"http://hooks.example.com:{port}/pinned", b"{}", None,
                                   policy=default, attempts=1, backoff_s=0, timeout_s=5,
                                   resolver=private_and_public))
    assert asyncio.run(deliver(f"http://hooks.example.com:{port}/pinned", b"{}", None,
                               policy=allowed, attempts=1, backoff_s=0, timeout_s=5,
                               resolver=loopback))
    (delivery,) = receiver.wait_for(1, "/pinned")
    assert delivery.headers["host"] == f"hooks.example.com:{port}"
