"""Baseten's route table on the local runner (the session server), over real HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import MODEL_NAME, WEBHOOK_SECRET, Server, WebhookReceiver, wait_for_status
from openai import OpenAI
from truss_llm.runner.webhooks import verify
from truss_llm.settings import CPU_PROFILE

TARGETS = ["production", "environments/production", "development", "deployment/local"]
CHAT = {"model": MODEL_NAME, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello"}]}


@pytest.mark.parametrize("target", TARGETS)
def test_predict_on_every_target(http: httpx.Client, target: str) -> None:
    response = http.post(f"/{target}/predict", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


@pytest.mark.parametrize("target", TARGETS)
def test_openai_sdk_on_the_sync_v1_base_path(server: Server, target: str) -> None:
    client = OpenAI(base_url=f"{server.base_url}/{target}/sync/v1", api_key="local",
                    max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    reply = client.chat.completions.create(**CHAT)
    assert reply.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    completion = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3)
    assert completion.object == "text_completion"


def test_openai_models_retrieve(server: Server) -> None:
    client = OpenAI(base_url=f"{server.base_url}/environments/production/sync/v1",
                    api_key="local", max_retries=0)
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(Exception) as missing:
        client.models.retrieve("gpt-9")
    assert getattr(missing.value, "status_code", None) == 404
    root = OpenAI(base_url=f"{server.base_url}/v1", api_key="local", max_retries=0)
    assert root.models.retrieve(MODEL_NAME).owned_by == "vllm"
    with pytest.raises(Exception) as missing:
        root.models.retrieve("gpt-9")
    assert getattr(missing.value, "status_code", None) == 404
    # The readiness probe keeps its own answer.
    assert httpx.get(f"{server.base_url}/v1/models/model").json() == {}


def test_models_route_lists_the_served_model(http: httpx.Client) -> None:
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == MODEL_NAME
    assert body["data"][0]["max_model_len"] == CPU_PROFILE["max_model_len"]


@pytest.mark.parametrize("path", ["/production/async_queue_status",
                                  "/environments/production/async_queue_status",
                                  "/development/async_queue_status",
                                  "/deployment/local/async_queue_status",
                                  "/async_queue_status"])
def test_queue_status_on_every_target(http: httpx.Client, path: str) -> None:
    body = http.get(path).json()
    assert set(body) == {"model_id", "deployment_id", "num_queued_requests",
                         "num_in_progress_requests"}
    assert body["model_id"] == "local" and body["deployment_id"] == "local"


@pytest.mark.parametrize("path", ["/production/wake", "/environments/production/wake",
                                  "/development/wake", "/deployment/local/wake", "/wake"])
def test_wake_on_every_target(http: httpx.Client, path: str) -> None:
    assert http.post(path).status_code == 202


@pytest.mark.parametrize("path", ["/environments/staging/predict", "/deployment/abc123/predict",
                                  "/environments/staging/async_predict"])
def test_unknown_target_is_a_404_that_names_what_exists(http: httpx.Client, path: str) -> None:
    response = http.post(path, json=CHAT)
    assert response.status_code == 404
    message = response.json()["error"]
    assert "production" in message and "deployment/local" in message


def test_unknown_target_on_openai_path_is_openai_shaped(server: Server) -> None:
    client = OpenAI(base_url=f"{server.base_url}/environments/staging/sync/v1", api_key="x",
                    max_retries=0)
    with pytest.raises(Exception) as error:
        client.chat.completions.create(**CHAT)
    assert getattr(error.value, "status_code", None) == 404


def test_wrong_method_and_unknown_action(http: httpx.Client) -> None:
    assert http.get("/production/predict").status_code == 405
    assert http.post("/production/frobnicate").status_code == 404
    assert http.get("/async_request/does-not-exist").status_code == 404


def test_truss_routes_still_answer(http: httpx.Client) -> None:
    assert http.get("/v1/models/model").status_code == 200
    assert http.post("/v1/models/model:predict", json=CHAT).status_code == 200
    assert "baseten_surface_requests_total" in http.get("/metrics/").text


def test_async_predict_succeeds_and_signs_its_webhook(
        server: Server, http: httpx.Client, receiver: WebhookReceiver) -> None:
    response = http.post("/production/async_predict", json={
        "model_input": CHAT, "webhook_endpoint": f"{receiver.url}/ok/success"})
    assert response.status_code == 201, response.text
    request_id = response.json()["request_id"]
    record = wait_for_status(server.base_url, request_id, {"SUCCEEDED"})
    assert record["model_id"] == "local" and record["errors"] == []
    [delivery] = [d for d in receiver.wait_for(1, "/ok/success")]
    assert verify(delivery.body, delivery.headers["x-baseten-signature"], WEBHOOK_SECRET)
    assert not verify(delivery.body + b" ", delivery.headers["x-baseten-signature"],
                      WEBHOOK_SECRET)
    payload = json.loads(delivery.body)
    assert payload["request_id"] == request_id
    assert payload["errors"] == []
    assert payload["data"]["object"] == "chat.completion"
    assert payload["data"]["usage"]["completion_tokens"] == 4
    final = wait_for_status(server.base_url, request_id, {"SUCCEEDED"})
    assert final["webhook_status"] in ("SUCCEEDED", "PENDING")


def test_async_without_webhook(server: Server, http: httpx.Client) -> None:
    request_id = http.post("/development/async_predict", json={"model_input": CHAT}).json()[
        "request_id"]
    record = wait_for_status(server.base_url, request_id, {"SUCCEEDED"})
    assert record["webhook_status"] == "NO_WEBHOOK_PROVIDED"


def test_async_bad_model_input_fails_without_retry(
        server: Server, http: httpx.Client, receiver: WebhookReceiver) -> None:
    request_id = http.post("/production/async_predict", json={
        "model_input": {"messages": []}, "webhook_endpoint": f"{receiver.url}/ok/bad",
        "inference_retry_config": {"max_attempts": 3, "initial_delay_ms": 0}}).json()[
        "request_id"]
    record = wait_for_status(server.base_url, request_id, {"FAILED"})
    assert record["errors"][0]["code"] == "MODEL_INVALID_INPUT"
    assert "at least one message" in record["errors"][0]["message"]
    [delivery] = receiver.wait_for(1, "/ok/bad")
    assert json.loads(delivery.body)["errors"][0]["code"] == "MODEL_INVALID_INPUT"


def test_webhook_that_never_succeeds_ends_webhook_failed(
        server: Server, http: httpx.Client, receiver: WebhookReceiver) -> None:
    request_id = http.post("/production/async_predict", json={
        "model_input": CHAT, "webhook_endpoint": f"{receiver.url}/fail/hook"}).json()[
        "request_id"]
    record = wait_for_status(server.base_url, request_id, {"WEBHOOK_FAILED"}, timeout=90)
    assert record["webhook_status"] == "FAILED"
    assert len(receiver.wait_for(3, "/fail/hook")) >= 3  # retried, default 3 attempts


@pytest.mark.parametrize(("body", "words"), [
    ({"model_input": CHAT, "priority": 3}, "priority"),
    ({"model_input": CHAT, "max_time_in_queue_seconds": 5}, "max_time_in_queue_seconds"),
    ({"model_input": CHAT, "inference_retry_config": {"max_attempts": 11}}, "max_attempts"),
    ({"model_input": CHAT, "webhook_endpoint": "ftp://x"}, "webhook_endpoint"),
    ({"model_input": {**CHAT, "stream": True}}, "stream"),
    ({"input": CHAT}, "model_input"),
])
def test_async_body_is_validated_to_basetens_ranges(http: httpx.Client, body: dict,
                                                     words: str) -> None:
    response = http.post("/production/async_predict", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_async_input_over_256_kib_is_refused(http: httpx.Client) -> None:
    big = {"model_input": {**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}}
    response = http.post("/production/async_predict", json=big)
    assert response.status_code == 413
    assert "256 KiB" in response.json()["error"]
