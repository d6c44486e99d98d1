"""The runner's safety defaults: no empty API key, no open runner off loopback, no secret in
a log line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import httpx
import pydantic
import pytest
from conftest import MODEL_NAME, REPO, Server, WebhookReceiver, free_port, wait_for_status
from truss_llm.runner.settings import RunnerSettings

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
