"""No body gets a 5xx: generated requests against the running server, over real HTTP.

Bodies come from vLLM's own request schemas (`ChatCompletionRequest`, `CompletionRequest`,
through hypothesis-jsonschema) and from hand-written mutations of a valid request: wrong
JSON types, huge numbers, odd unicode (lone surrogates, NULs, bidi marks), deep nesting,
broken tools and `tool_choice`, `response_format`, `structured_outputs` and message shapes,
and bodies that are not JSON objects at all. Each goes to one of the OpenAI routes, Baseten's
predict and async_predict, or the sync OpenAI base path of the session server. The property:
the server answers (no dropped connection, no hang), never with a 5xx other than 503 while
the engine cannot serve (a retryable state, not a crash), and answers a plain request
afterwards.

Generation stays cheap: `max_tokens` is clamped to a few tokens (and set when absent), as
are `n`, `best_of` and `min_tokens`, so the engine does little work per example. The
example count is bounded for the suite (250: 15-20 s on a quiet machine, about a minute at
load 20 on 2 cores); a longer hunt:

    TRUSS_LLM_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz_requests.py

Runs are reproducible: a fixed seed (`TRUSS_LLM_FUZZ_SEED` to vary it), and failing
examples are kept in hypothesis's database under .pytest_cache/ and replayed first.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import pytest
from conftest import REPO, Server
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis_jsonschema import from_schema
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

EXAMPLES = int(os.environ.get("TRUSS_LLM_FUZZ_EXAMPLES", "250"))
SEED = int(os.environ.get("TRUSS_LLM_FUZZ_SEED", "20261130"))
DATABASE = DirectoryBasedExampleDatabase(REPO / ".pytest_cache" / "hypothesis")
# Generation per example: enough tokens to exercise the output path, few enough to be cheap.
MAX_FUZZ_TOKENS = 4
MAX_FUZZ_CHOICES = 2
REQUEST_TIMEOUT_S = 60
# 503 with Retry-After is the engine saying "not now" (restarting, scaled to zero): allowed.
RETRYABLE_5XX = {503}

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PREDICT = "/production/predict"
ASYNC_PREDICT = "/production/async_predict"
SYNC_CHAT = "/environments/production/sync/v1/chat/completions"
# Async inputs accepted during the fuzzing, checked once they have run.
QUEUED: list[tuple[str, bytes]] = []
ASYNC_SETTLE_S = 120
# The worker's codes for a model answering 5xx or breaking (a 4xx is MODEL_INVALID_INPUT).
SERVER_FAULTS = {"MODEL_PREDICT_ERROR", "MODEL_UNAVAILABLE", "INTERNAL_SERVER_ERROR"}
PLAIN_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PLAIN_COMPLETION = {"prompt": "hi", "max_tokens": 2}


CHAT_SCHEMA = ChatCompletionRequest.model_json_schema()
COMPLETION_SCHEMA = CompletionRequest.model_json_schema()
CHAT_KEYS = sorted(CHAT_SCHEMA["properties"])
COMPLETION_KEYS = sorted(COMPLETION_SCHEMA["properties"])

# -- values --------------------------------------------------------------------------------
ODD_STRINGS = ["", "\x00", "\ud800", "\udfff", "\u202e\u2066rtl", "\ufeff", "\uffff",
               "\U0010ffff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301" * 50, "\x00" * 64, "<|im_start|>",
               "{{ raise('x') }}", "%s%n", "a" * 5000, "🦙" * 300]
HUGE_NUMBERS = [2**63, -(2**63) - 1, 10**40, -(10**40), 1e308, -1e308, 5e-324, 0, -1,
                0.5, 1.7976931348623157e308, 2**31, 2**53 + 1]
odd_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ODD_STRINGS)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(HUGE_NUMBERS)
           | odd_text)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(odd_text | st.sampled_from(CHAT_KEYS), inner, max_size=4),
    max_leaves=10)

FUNCTION = {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}
TOOLS = [
    [{"type": "function"}], [{"type": "function", "function": {}}],
    [{"type": "function", "function": {"name": "f"}}],
    [{"type": "function", "function": {"name": None}}],
    [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
    [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 5,
                                               "maximum": 1}}}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}],
    [{"type": "function", "function": {"name": "", "parameters": {}}}],
    [{"type": "function", "function": FUNCTION}, {"type": "function", "function": FUNCTION}],
    [{"type": "function", "function": FUNCTION}], [{"type": "custom", "custom": {"name": "c"}}],
    [{"type": "custom"}], [1], [None], "x", {}, [],
]
TOOL_CHOICES = [
    "auto", "none", "required", "bogus", 5, None, {},
    {"type": "function", "function": {"name": "f"}},
    {"type": "function", "function": {"name": "g"}}, {"type": "function"},
    {"type": "function", "function": {}}, {"type": "function", "function": {"name": None}},
    {"type": "custom", "custom": {"name": "c"}},
    {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
]
_SCHEMA_X = {"name": "x", "schema": {"type": "object"}}
RESPONSE_FORMATS = [
    {"type": "json_object"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema", "json_schema": _SCHEMA_X},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "str"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 3, "maximum": 1}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "("}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
    {"type": "text"}, {"type": "structural_tag"},
    {"type": "structural_tag", "structures": [{}], "triggers": [1]},
    {"type": "structural_tag", "format": 5}, {"type": "regex"}, {}, "json", 5, [],
]
STRUCTURED_OUTPUTS = [
    5, "x", [], {}, {"json": 5}, {"json": "not json"}, {"json": "{}"}, {"regex": "("},
    {"regex": 5}, {"choice": []}, {"choice": [1]}, {"choice": "ab"}, {"grammar": "nonsense"},
    {"grammar": 5}, {"json": {"type": "object"}, "regex": "a"}, {"structural_tag": "x"},
    {"structural_tag": "{}"}, {"json_object": "yes"}, {"json_object": True},
    {"whitespace_pattern": 5}, {"disable_any_whitespace": "no"}, {"json": {"type": "bogus"}},
]
_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
MESSAGE_LISTS = [
    [{"role": "assistant", "tool_calls": [{**_CALL, "function": {"name": None,
                                                                  "arguments": "{}"}}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {**_CALL, "function": {"name": "f", "arguments": "not json"}}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {**_CALL, "function": {"name": "f", "arguments": {"a": 1}}}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {**_CALL, "function": {"name": "f"}}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": "x"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [_CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": "ok"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [_CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": 5}]}],
    [{"role": "tool", "tool_call_id": "nope", "content": "orphan"}],
    [{"role": "assistant", "content": None, "function_call": {"name": None}}],
    [{"role": "assistant", "content": "hi", "reasoning_content": 5}],
    [{"role": "user", "content": "hi", "name": 5}],
    [{"role": "user", "content": {"a": 1}}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{}]}], [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [None]}], [{"role": "user", "content": ["hi"]}],
    [{"role": "user", "content": [{"type": "image_url"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,!!!"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "@@", "format": "wav"}}]}],
    [{"role": "user", "content": [{"type": "file", "file": {}}]}],
    [{"role": "user", "content": [{"type": "file", "file": {"file_data": "@@"}}]}],
    [{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64,AAAA"}}]}],
    [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}],
    [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}],
    [{"role": "system", "content": []}], [{"role": None, "content": "hi"}],
    [{"role": "user", "content": "hi"}] * 40, [[]], [None], "hi", {}, 5,
]
STREAM_OPTIONS = [{"include_usage": True}, {"include_usage": "yes"},
                  {"continuous_usage_stats": True}, {}, 5, "x",
                  {"include_usage": True, "continuous_usage_stats": True}]
TARGETED = {"stream_options": STREAM_OPTIONS, "tools": TOOLS, "tool_choice": TOOL_CHOICES,
            "response_format": RESPONSE_FORMATS, "structured_outputs": STRUCTURED_OUTPUTS,
            "messages": MESSAGE_LISTS}
# Bodies no JSON encoder writes: literals Python's parser takes or refuses in odd ways.
_BASE = '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"temperature":%s}'
RAW_BODIES = [
    b"", b"   ", b"null", b"[]", b'"x"', b"5", b"\xff\xfe\x00", b'{"messages":', b"{" * 5,
    b"[" * 100_000, b'{"a":' * 50_000, b"\xef\xbb\xbf" + json.dumps(PLAIN_CHAT).encode(),
    json.dumps(PLAIN_CHAT).encode("utf-16"), b'{"messages": [{"role": "user", '
    b'"content": "\\ud800"}], "max_tokens": 2}',
    *((_BASE % literal).encode() for literal in (
        "NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "-0", "1e-400")),
    b'{"messages":[{"role":"user","content":"hi"}],"messages":5}',
]


def _clamp_int(body: dict[str, Any], key: str, ceiling: int) -> None:
    value = body.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > ceiling:
        body[key] = ceiling


def cheap(body: Any, stream: bool = False) -> Any:
    """The same request with little generation work: few tokens and few choices; with
    `stream`, streamed unless the body says otherwise (generated bodies rarely ask)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if stream:
        body.setdefault("stream", True)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_FUZZ_TOKENS
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _clamp_int(body, key, MAX_FUZZ_TOKENS)
    for key in ("n", "best_of"):
        _clamp_int(body, key, MAX_FUZZ_CHOICES)
    return body


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """A valid request with one to three fields set to something else."""
    body = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(TARGETED)) | st.sampled_from(keys) | odd_text)
        pool = TARGETED.get(key)
        body[key] = draw(st.sampled_from(pool) | json_values if pool else json_values)
    return body


def deeply_nested(depth: int, key: str) -> dict[str, Any]:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return {**PLAIN_CHAT, key: value}


chat_bodies = (from_schema(CHAT_SCHEMA) | mutated(PLAIN_CHAT, CHAT_KEYS)
               | st.builds(deeply_nested, st.integers(50, 900),
                           st.sampled_from(["messages", "tools", "stop", "metadata"])))
completion_bodies = from_schema(COMPLETION_SCHEMA) | mutated(PLAIN_COMPLETION, COMPLETION_KEYS)
async_fields = st.fixed_dictionaries({}, optional={
    "priority": json_values, "max_time_in_queue_seconds": json_values,
    "inference_retry_config": json_values | st.fixed_dictionaries({}, optional={
        "max_attempts": json_values, "initial_delay_ms": json_values,
        "max_delay_ms": json_values}),
    "webhook_endpoint": st.none() | odd_text | st.sampled_from(
        ["ftp://x", "http://", "http://169.254.169.254/", "https://[::1]/", "http://a b"])})


@st.composite
def async_bodies(draw: st.DrawFn) -> Any:
    model_input = draw(chat_bodies.map(cheap) | completion_bodies.map(cheap) | json_values)
    return {"model_input": model_input, **draw(async_fields)}


def _encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


requests = st.one_of(
    st.tuples(st.sampled_from([CHAT, SYNC_CHAT, PREDICT]), st.builds(cheap, chat_bodies,
                                                                      st.booleans())),
    st.tuples(st.sampled_from([COMPLETIONS, PREDICT]), st.builds(cheap, completion_bodies,
                                                                  st.booleans())),
    st.tuples(st.just(ASYNC_PREDICT), async_bodies() | json_values),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS, PREDICT, ASYNC_PREDICT, SYNC_CHAT]),
              st.sampled_from(RAW_BODIES)),
).map(lambda pair: (pair[0], _encode(pair[1])))


def post(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    try:
        return http.post(path, content=body, headers={"content-type": "application/json"})
    except httpx.TransportError as exc:  # dropped, reset, or no answer in time
        raise AssertionError(f"POST {path} got no complete answer: {exc!r}; "
                             f"body {body[:300]!r}") from exc


def stream_errors(text: str) -> list[dict[str, Any]]:
    """The `error` objects of an SSE body's data events."""
    errors = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: "):])
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                errors.append(event["error"])
    return errors


@pytest.fixture(scope="module")
def fuzz_http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers=server.headers,
                      timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, database=DATABASE, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much, HealthCheck.large_base_example])
@given(request=requests)
# The 500s the issue names, always tried: vLLM's validators index into the raw body.
@example(request=(CHAT, _encode({**PLAIN_CHAT, "tools": [{"type": "function"}],
                                  "tool_choice": {"type": "function", "function": {"name": "f"}}})))
@example(request=(CHAT, _encode({**PLAIN_CHAT, "structured_outputs": 5})))
@example(request=(PREDICT, _encode({**PLAIN_CHAT, "messages": MESSAGE_LISTS[0]})))
@example(request=(COMPLETIONS, b"[" * 100_000))
def test_no_body_gets_a_5xx(fuzz_http: httpx.Client, request: tuple[str, bytes]) -> None:
    path, body = request
    response = post(fuzz_http, path, body)
    assert response.status_code < 500 or response.status_code in RETRYABLE_5XX, (
        f"POST {path} -> {response.status_code} {response.text[:500]}\nbody {body[:500]!r}")
    if response.status_code >= 400:  # an error a client can read, in the route's shape
        error = response.json()["error"]
        assert isinstance(error, dict if "/v1/" in path else str), response.text[:300]
    elif path == ASYNC_PREDICT:
        QUEUED.append((response.json()["request_id"], body))
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        # A stream that has begun reports a failure as an error event, not a status.
        for event in stream_errors(response.text):
            assert event["code"] < 500 or event["code"] in RETRYABLE_5XX, (
                f"POST {path} streamed {event}\nbody {body[:500]!r}")


def test_server_answers_after_the_fuzzing(fuzz_http: httpx.Client) -> None:
    """Runs after the fuzz test (file order): nothing it sent broke the server, and no
    queued async input made the model fail with a 5xx either."""
    started = time.monotonic()
    for path, body in ((CHAT, PLAIN_CHAT), (COMPLETIONS, PLAIN_COMPLETION),
                       (PREDICT, PLAIN_CHAT), (SYNC_CHAT, PLAIN_CHAT)):
        response = post(fuzz_http, path, json.dumps(body).encode())
        assert response.status_code == 200, (path, response.text[:300])
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    pending = dict(QUEUED)
    deadline = time.monotonic() + ASYNC_SETTLE_S
    while pending and time.monotonic() < deadline:
        for request_id, body in list(pending.items()):
            record = fuzz_http.get(f"/async_request/{request_id}").json()
            failures = [e for e in record["errors"] if e["code"] in SERVER_FAULTS]
            assert not failures, f"async input {body[:500]!r} -> {failures}"
            if record["status"] not in ("QUEUED", "IN_PROGRESS"):
                del pending[request_id]
        time.sleep(0.2)


def test_a_big_body_is_decoded_off_the_loop_and_still_answered(fuzz_http: httpx.Client
                                                               ) -> None:
    """Past THREAD_DECODE_BYTES the body is decoded in a worker thread: same answers."""
    from truss_llm.openai_surface import THREAD_DECODE_BYTES

    padding = "x" * (2 * THREAD_DECODE_BYTES)
    answered = post(fuzz_http, CHAT, json.dumps(
        {**PLAIN_CHAT, "metadata": {"note": padding}}).encode())
    assert answered.status_code == 200, answered.text[:300]
    refused = post(fuzz_http, CHAT, json.dumps(
        {**PLAIN_CHAT, "metadata": {"note": padding}, "stop": ["\udfff"]}).encode())
    assert refused.status_code == 400, refused.text[:300]
    assert refused.json()["error"]["param"] == "stop[0]"
