"""The sync budget, end to end: no request is cut off by a 504; each comes back complete.

This module's runner compresses Baseten's 1200 s sync budget to 4 s (the runner's timeout
and the model's own budget for the truss routes) with a 1 s margin, and lets the engine
run 4 sequences at once, so that later requests really wait in its queue. A request for
thousands of tokens at the tiny model's speed cannot finish in 4 s: it must come back
before the deadline, `finish_reason: "length"`, marked as ended by the budget.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import (
    LOOPBACK_MEDIA,
    MODEL_NAME,
    Server,
    WebhookReceiver,
    start_server,
    stop_server_soon,
    wait_for_status,
)
from openai import BadRequestError, OpenAI
from truss_llm.budget import (
    BUDGET_HEADER,
    CLAMPED_HEADER,
    MARKER_FIELD,
    MARKER_HEADER,
    POLICY_HEADER,
)

BUDGET_S = 4.0
MARGIN_S = 1.0
# Far more than fits in BUDGET_S at any speed this machine reaches (~300-600 tokens/s).
LONG_TOKENS = 3500
LONG = {"model": MODEL_NAME, "max_tokens": LONG_TOKENS, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story."}]}
SHORT = {**LONG, "max_tokens": 16}
# Several times what fits in the sync budget; a few seconds of work for the async one.
ASYNC_TOKENS = 2000
# Every route a sync request can take: Baseten's predict, Baseten's OpenAI base path, and
# the truss server's own route (no runner timeout there: the model's budget alone).
ROUTES = ["/production/predict", "/environments/production/sync/v1/chat/completions",
          "/v1/chat/completions"]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("budget") / "server.log", "--sync-timeout", str(BUDGET_S),
        extra_env={**LOOPBACK_MEDIA,
                   "TRUSS_LLM_BUDGET_SYNC_S": str(BUDGET_S),
                   "TRUSS_LLM_BUDGET_MARGIN_S": str(MARGIN_S),
                   "TRUSS_LLM_RUNNER_ASYNC_RUN_TIMEOUT_S": "900",
                   "TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "4096",
                   "TRUSS_LLM_ENGINE_MAX_NUM_SEQS": "4",
                   # The ramp queues up to 15 requests: admission must not refuse them.
                   "TRUSS_LLM_ENGINE_MAX_NUM_QUEUED_REQS": "64"})
    yield srv
    stop_server_soon(srv)


@pytest.fixture(scope="module")
def http(budgeted: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=budgeted.base_url, timeout=60) as session:
        yield session


def read_stream(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def stream(http: httpx.Client, path: str, body: dict[str, Any], **headers: str
           ) -> tuple[int, list[str], float]:
    started = time.monotonic()
    with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as response:
        events = read_stream(response) if response.status_code == 200 else [response.read()]
    return response.status_code, events, time.monotonic() - started


def assert_marked_stream(events: list[str], max_tokens: int = LONG_TOKENS) -> dict:
    """Ends with [DONE], after a last chunk carrying the marker and the usage."""
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last[MARKER_FIELD] is True
    assert 0 <= last["usage"]["completion_tokens"] < max_tokens
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                if c.get("finish_reason")]
    assert finishes == ["length"]
    assert not any("error" in json.loads(e) for e in events[:-1])
    return last


def assert_marked_answer(response: httpx.Response, max_tokens: int = LONG_TOKENS) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body[MARKER_FIELD] is True
    assert response.headers[MARKER_HEADER] == "true"
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 <= body["usage"]["completion_tokens"] < max_tokens
    return body


@pytest.mark.parametrize("path", ROUTES)
def test_long_request_is_complete_and_marked_before_the_deadline(
        http: httpx.Client, path: str) -> None:
    started = time.monotonic()
    response = http.post(path, json=LONG)
    elapsed = time.monotonic() - started
    body = assert_marked_answer(response)
    assert body["usage"]["completion_tokens"] > 0
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s"


@pytest.mark.parametrize("path", ROUTES)
def test_long_stream_ends_with_the_marker_usage_and_done(http: httpx.Client, path: str
                                                         ) -> None:
    status, events, elapsed = stream(http, path, LONG)
    assert status == 200
    assert_marked_stream(events)
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s"


def test_completions_route_is_held_to_the_budget_too(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS,
            "ignore_eos": True}
    started = time.monotonic()
    assert_marked_answer(http.post("/v1/completions", json=body))
    assert time.monotonic() - started < BUDGET_S
    status, events, elapsed = stream(http, "/v1/completions", body)
    assert status == 200
    assert elapsed < BUDGET_S
    assert_marked_stream(events)


def test_openai_sdk_sees_a_complete_answer_and_the_marker(budgeted: Server) -> None:
    client = OpenAI(base_url=f"{budgeted.base_url}/environments/production/sync/v1",
                    api_key="local", max_retries=0, timeout=30)
    reply = client.chat.completions.create(**{k: v for k, v in LONG.items()
                                              if k != "ignore_eos"},
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.model_extra[MARKER_FIELD] is True
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=LONG["messages"], max_tokens=LONG_TOKENS, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks[-1].model_extra[MARKER_FIELD] is True
    assert chunks[-1].usage is not None
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == \
        ["length"]


def test_a_request_that_fits_is_untouched(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json=SHORT)
    assert answer.status_code == 200
    assert MARKER_FIELD not in answer.json() and MARKER_HEADER not in answer.headers
    assert answer.json()["usage"]["completion_tokens"] == 16
    status, events, _ = stream(http, "/v1/chat/completions", SHORT)
    assert status == 200 and events[-1] == "[DONE]"
    # The client did not ask for usage: the usage chunk the budget needs is not sent.
    assert all(json.loads(e)["choices"] for e in events[:-1])


def _learn_speed(http: httpx.Client) -> None:
    for _ in range(3):  # the replica measures its speed from requests it serves
        assert stream(http, "/v1/chat/completions", {**SHORT, "max_tokens": 64})[0] == 200


def test_reject_policy_answers_at_once_with_advice(http: httpx.Client,
                                                   budgeted: Server) -> None:
    _learn_speed(http)
    started = time.monotonic()
    response = http.post("/production/predict", json=LONG, headers={POLICY_HEADER: "reject"})
    assert response.status_code == 400, response.text
    assert "async_predict" in response.json()["error"]
    assert time.monotonic() - started < 1.0
    client = OpenAI(base_url=f"{budgeted.base_url}/environments/production/sync/v1",
                    api_key="local", max_retries=0, timeout=30,
                    default_headers={POLICY_HEADER: "reject"})
    with pytest.raises(BadRequestError, match="async_predict"):
        client.chat.completions.create(model=MODEL_NAME, messages=LONG["messages"],
                                       max_tokens=LONG_TOKENS, stream=True)
    fits = http.post("/production/predict", json=SHORT, headers={POLICY_HEADER: "reject"})
    assert fits.status_code == 200


def test_truncate_policy_clamps_to_what_fits_at_the_measured_speed(http: httpx.Client
                                                                   ) -> None:
    _learn_speed(http)
    started = time.monotonic()
    response = http.post("/production/predict", json=LONG)
    body = assert_marked_answer(response)
    assert time.monotonic() - started < BUDGET_S
    clamped_to = int(response.headers[CLAMPED_HEADER])
    assert 0 < body["usage"]["completion_tokens"] <= clamped_to < LONG_TOKENS
    status, events, _ = stream(http, "/environments/production/sync/v1/chat/completions",
                               LONG)
    assert status == 200
    assert_marked_stream(events)


def test_a_request_may_shorten_its_budget_but_not_lengthen_it(http: httpx.Client) -> None:
    started = time.monotonic()
    assert_marked_answer(http.post("/production/predict", json=LONG,
                                   headers={BUDGET_HEADER: "1"}))
    assert time.monotonic() - started < 2.0  # well inside the 4 s budget it shortened
    started = time.monotonic()
    assert_marked_answer(http.post("/v1/chat/completions", json=LONG,
                                   headers={BUDGET_HEADER: "600"}))
    assert time.monotonic() - started < BUDGET_S
    bad = http.post("/v1/chat/completions", json=LONG, headers={BUDGET_HEADER: "soon"})
    assert bad.status_code == 400
    assert BUDGET_HEADER in bad.json()["error"]["message"]


def test_async_work_gets_the_async_budget(http: httpx.Client, budgeted: Server,
                                          receiver: WebhookReceiver) -> None:
    """Through async_predict, a request the sync budget would cut runs to its end."""
    response = http.post("/production/async_predict", json={
        "model_input": {**LONG, "max_tokens": ASYNC_TOKENS},
        "webhook_endpoint": f"{receiver.url}/budget-async"})
    assert response.status_code == 201
    record = wait_for_status(budgeted.base_url, response.json()["request_id"],
                             {"SUCCEEDED", "FAILED", "WEBHOOK_FAILED"}, timeout=240)
    assert record["status"] == "SUCCEEDED", record
    (delivery,) = receiver.wait_for(1, "/budget-async")
    output = json.loads(delivery.body)["data"]
    assert output["usage"]["completion_tokens"] == ASYNC_TOKENS
    assert output["choices"][0]["finish_reason"] == "length"
    assert MARKER_FIELD not in output


class SlowServer:
    """Serves one text document on 127.0.0.1 after a delay: a slow object store."""

    def __init__(self, delay_s: float, text: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notes.txt"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _with_document(url: str) -> dict:
    return {**LONG, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarize:"},
        {"type": "file", "file": {"file_url": url, "filename": "notes.txt"}}]}]}


def test_media_fetching_is_charged_to_the_deadline(http: httpx.Client) -> None:
    slow = SlowServer(1.5, b"The weather in Oslo is cold. " * 4)
    try:
        started = time.monotonic()
        body = assert_marked_answer(http.post("/production/predict",
                                              json=_with_document(slow.url)))
        elapsed = time.monotonic() - started
        assert 1.5 <= elapsed < BUDGET_S, f"{elapsed:.2f} s"
        # Less time left to generate than a request without the fetch had.
        plain = assert_marked_answer(http.post("/production/predict", json=LONG))
        assert body["usage"]["completion_tokens"] < plain["usage"]["completion_tokens"]
    finally:
        slow.close()
    stuck = SlowServer(BUDGET_S * 3, b"never in time")
    try:
        started = time.monotonic()
        response = http.post("/production/predict", json=_with_document(stuck.url))
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text  # the store did not answer in time
        assert "notes.txt" in response.json()["error"]
        assert elapsed < BUDGET_S, f"{elapsed:.2f} s"
    finally:
        stuck.close()


def test_waiting_in_the_engine_queue_is_charged_to_the_deadline(http: httpx.Client,
                                                               budgeted: Server) -> None:
    """Four async jobs (the async budget: seconds of work each) fill the engine's four
    sequences; a sync request with a 1 s budget waits behind them in the engine's queue
    and comes back, complete and marked, when its time is up, without a token."""
    jobs = [http.post("/production/async_predict", json={
        "model_input": {**LONG, "max_tokens": ASYNC_TOKENS}}).json()["request_id"]
        for _ in range(4)]
    try:
        wait_until(lambda: budgeted.unfinished_requests() >= 4)
        started = time.monotonic()
        waiting = http.post("/v1/chat/completions", json=LONG,
                            headers={BUDGET_HEADER: "1"})
        elapsed = time.monotonic() - started
        body = assert_marked_answer(waiting)
        assert elapsed < 2.0, f"{elapsed:.2f} s"  # its own budget, not the jobs'
        assert body["usage"]["completion_tokens"] == 0
    finally:  # leave the engine idle for the next test
        for request_id in jobs:
            wait_for_status(budgeted.base_url, request_id, {"SUCCEEDED", "FAILED"}, 120)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_ramp_of_long_requests_is_never_cut_off_by_the_504(http: httpx.Client) -> None:
    """1, 2, 4 then 8 long requests at once (15 in all, half of them streams): every one
    ends in time, complete and marked; none meets the runner's 504."""
    results: list[tuple[str, int, Any, float]] = []

    def one(index: int) -> None:
        path = ROUTES[index % 2]
        if index % 2:
            status, events, elapsed = stream(http, path, LONG)
            results.append(("stream", status, events, elapsed))
        else:
            started = time.monotonic()
            response = http.post(path, json=LONG)
            results.append(("json", response.status_code, response, time.monotonic() - started))

    futures = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for step in (1, 2, 4, 8):
            futures += [pool.submit(one, len(futures) + i) for i in range(step)]
            time.sleep(0.4)
        for future in futures:
            future.result()
    assert len(results) == 15
    for kind, status, payload, elapsed in results:
        assert status == 200, (kind, status)
        assert elapsed < BUDGET_S, f"{kind}: {elapsed:.2f} s"
        if kind == "stream":
            assert_marked_stream(payload)
        else:
            assert_marked_answer(payload)


# The Responses and Anthropic Messages routes share the chat route's engine wrapper. A long
# Responses answer ignores EOS as chat's does; the Messages API has no such parameter, so
# a schema that needs thousands of digits keeps the tiny model from ending early.
LONG_RESPONSE = {"model": MODEL_NAME, "input": "Write a very long story.",
                 "max_output_tokens": LONG_TOKENS, "ignore_eos": True}
DIGITS = {"type": "object", "required": ["digits"], "additionalProperties": False,
          "properties": {"digits": {"type": "array", "minItems": LONG_TOKENS,
                                    "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}
LONG_MESSAGE = {"model": MODEL_NAME, "max_tokens": LONG_TOKENS,
                "messages": [{"role": "user", "content": "Count."}],
                "output_config": {"format": {"type": "json_schema", "schema": DIGITS}}}


def named_events(http: httpx.Client, path: str, body: dict[str, Any]
                 ) -> tuple[dict[str, dict], float]:
    """The last event of each name in a Responses or Messages stream, and the time taken."""
    started = time.monotonic()
    events: dict[str, dict] = {}
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: ") and name:
                events[name] = json.loads(line[len("data: "):])
    return events, time.monotonic() - started


@pytest.mark.parametrize("prefix", ["", "/environments/production/sync"])
def test_responses_and_messages_are_held_to_the_budget(http: httpx.Client, prefix: str
                                                       ) -> None:
    started = time.monotonic()
    response = http.post(f"{prefix}/v1/responses", json=LONG_RESPONSE)
    assert time.monotonic() - started < BUDGET_S
    assert response.status_code == 200 and response.headers[MARKER_HEADER] == "true"
    body = response.json()
    assert body[MARKER_FIELD] is True and body["status"] == "incomplete"
    assert 0 < body["usage"]["output_tokens"] < LONG_TOKENS

    started = time.monotonic()
    message = http.post(f"{prefix}/v1/messages", json=LONG_MESSAGE)
    assert time.monotonic() - started < BUDGET_S
    assert message.status_code == 200 and message.headers[MARKER_HEADER] == "true"
    assert message.json()[MARKER_FIELD] is True
    assert message.json()["stop_reason"] == "max_tokens"


def test_responses_and_messages_streams_end_marked_before_the_deadline(http: httpx.Client
                                                                       ) -> None:
    events, elapsed = named_events(http, "/v1/responses", LONG_RESPONSE)
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s"
    final = events.get("response.completed") or events["response.incomplete"]
    assert final[MARKER_FIELD] is True and final["response"]["status"] == "incomplete"

    events, elapsed = named_events(http, "/v1/messages", LONG_MESSAGE)
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s"
    assert events["message_delta"][MARKER_FIELD] is True
    assert events["message_delta"]["delta"]["stop_reason"] == "max_tokens"
    assert "message_stop" in events
