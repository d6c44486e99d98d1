"""A user's mistake is a 4xx with an OpenAI-shaped body that says what to fix, never a 500.

Each case goes through the real truss server, which wraps exceptions from model code into
500s: these tests are what proves the status code survives it.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL_NAME
from openai import OpenAI
from truss_llm.settings import CPU_PROFILE

# More tokens than the tiny model's context holds (a word is about a token).
TOO_LONG = CPU_PROFILE["max_model_len"] + 100

USER = [{"role": "user", "content": "hi"}]


def chat_body(**overrides) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": USER, "max_tokens": 4,
                       **overrides}).encode()


CASES = {
    # name: (raw body, expected status, words the message must contain, expected param)
    "invalid json": (b'{"model": "tiny-chat", "messages": [', 400, "not valid JSON", None),
    "empty body": (b"", 400, "empty", None),
    "not an object": (b'["hi"]', 400, "JSON object", None),
    "missing messages": (json.dumps({"model": MODEL_NAME}).encode(), 400, "messages",
                         "messages"),
    "empty messages": (chat_body(messages=[]), 400, "at least one message", "messages"),
    "messages not a list": (chat_body(messages="hi"), 400, "array", "messages"),
    "message not an object": (chat_body(messages=["hi"]), 400, "role", "messages[0]"),
    "unknown role": (chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400,
                     "wizard", "messages[0].role"),
    "missing content": (chat_body(messages=[{"role": "user"}]), 400, "content",
                        "messages[0].content"),
    "tool message without id": (
        chat_body(messages=[*USER, {"role": "tool", "content": "18"}]), 400, "tool_call_id",
        "messages[1].tool_call_id"),
    "negative max_tokens": (chat_body(max_tokens=-5), 400, "max_tokens", "max_tokens"),
    "absurd max_tokens": (chat_body(max_tokens=10**12), 400, "max_tokens", "max_tokens"),
    "zero max_completion_tokens": (chat_body(max_tokens=None, max_completion_tokens=0), 400,
                                   "max_completion_tokens", "max_completion_tokens"),
    "temperature wrong type": (chat_body(temperature="hot"), 400, "temperature",
                               "temperature"),
    "n wrong type": (chat_body(n="three"), 400, "n", "n"),
    # pydantic alone would coerce these: "yes" to true, "2" to 2.
    "stream as a string": (chat_body(stream="yes"), 400, "expected a boolean", "stream"),
    "n as a numeric string": (chat_body(n="2"), 400, "expected an integer", "n"),
    "logprobs as a number": (chat_body(logprobs=1), 400, "expected a boolean", "logprobs"),
    "temperature as true": (chat_body(temperature=True), 400, "expected a number",
                            "temperature"),
    "prompt longer than context": (
        chat_body(messages=[{"role": "user", "content": "weather " * TOO_LONG}]), 400,
        "maximum context length", None),
    "schema that cannot compile": (
        chat_body(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object",
                                    "properties": {"a": {"type": "no-such-type"}}}}}),
        400, "schema", None),
    "unknown model": (chat_body(model="gpt-9-ultra"), 404, "gpt-9-ultra", "model"),
    "tool_choice names an unknown tool": (
        chat_body(tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}],
                  tool_choice={"type": "function", "function": {"name": "g"}}),
        400, "tool_choice", "tool_choice"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_chat_request_gets_openai_4xx(http: httpx.Client, name: str) -> None:
    body, status, words, param = CASES[name]
    response = http.post("/v1/chat/completions", content=body,
                         headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status
    assert words.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param


def test_bad_completion_request_gets_openai_4xx(http: httpx.Client) -> None:
    missing = http.post("/v1/completions", json={"model": MODEL_NAME})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "prompt"
    echo = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                              "echo": "true", "max_tokens": 2})
    assert echo.status_code == 400
    assert (echo.json()["error"]["param"], echo.json()["error"]["code"]) == ("echo", 400)
    # On completions `logprobs` is a count, and a float that is a whole number is one.
    counted = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                 "logprobs": 2, "max_tokens": 2, "n": 1.0})
    assert counted.status_code == 200, counted.text
    too_long = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "a " * TOO_LONG})
    assert too_long.status_code == 400
    assert "context length" in too_long.json()["error"]["message"]


def test_sdk_raises_typed_errors(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=4)
    assert "at least one message" in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER, max_tokens=4)
    # A generative model has no embeddings: a 404 that says so, in OpenAI's shape.
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model=MODEL_NAME, input="hello")
    assert "has no embeddings" in missing.value.message
    assert missing.value.body["type"] == "not_found_error"


def test_embeddings_on_the_baseten_path_say_why(http: httpx.Client) -> None:
    missing = http.post("/environments/production/sync/v1/embeddings",
                        json={"model": MODEL_NAME, "input": "hello"})
    assert missing.status_code == 404
    assert "has no embeddings" in missing.json()["error"]["message"]


def test_server_still_serves_after_errors(client: OpenAI, http: httpx.Client) -> None:
    for name in CASES:
        http.post("/v1/chat/completions", content=CASES[name][0])
    reply = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert http.get("/v1/models/model").status_code == 200
