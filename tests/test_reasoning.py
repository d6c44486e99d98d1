"""Reasoning models: with `reasoning_parser` set, vLLM's parser splits the reasoning from the
answer, into the message's `reasoning` field, streaming and not (issue 12 item 4).

The tiny model has no reasoning training, so its output is forced into a reasoning model's
shape with a regex (vLLM's `structured_outputs`): the markers of the `granite` parser, "Here
is my thought process:" and "Here is my response:", around a few words each. The grammar must
hold during the reasoning too, which vLLM's `structured_outputs_config.enable_in_reasoning`
allows; both settings reach this server as `TRUSS_LLM_ENGINE_*` variables, like any engine
argument. One small server, for this module only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from conftest import MODEL_NAME, Server, start_server, stop_server_soon

THINK = "Here is my thought process:"
ANSWER = "Here is my response:"
# A few lowercase words after each marker: short, and no way to skip a marker.
SHAPE = f"{THINK}( [a-z]{{1,6}}){{2,5}} {ANSWER}( [a-z]{{1,6}}){{1,3}}"
REASONING_ENV = {
    "TRUSS_LLM_ENGINE_REASONING_PARSER": "granite",
    "TRUSS_LLM_ENGINE_STRUCTURED_OUTPUTS_CONFIG": json.dumps(
        {"backend": "xgrammar", "disable_any_whitespace": True, "enable_in_reasoning": True}),
    "TRUSS_LLM_ENGINE_MAX_NUM_SEQS": "4",
}
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("reasoning") / "server.log",
                          extra_env=REASONING_ENV)
    yield server
    stop_server_soon(server)


def body(**extra: object) -> dict:
    return {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": "Is the sky blue? Think first."}],
            "structured_outputs": {"regex": SHAPE}, **extra}


def words(text: str) -> list[str]:
    return text.split()


def test_reasoning_comes_back_apart_from_the_answer(reasoning_server: Server) -> None:
    response = httpx.post(f"{reasoning_server.base_url}/v1/chat/completions", json=body(),
                          timeout=120)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    reasoning, content = message["reasoning"], message["content"]
    assert reasoning and content, message
    # The parser took the markers out and split at them.
    assert THINK not in reasoning and ANSWER not in reasoning and ANSWER not in content
    assert 2 <= len(words(reasoning)) <= 5 and 1 <= len(words(content)) <= 3
    assert all(word.isalpha() and word.islower() for word in words(reasoning + content))


def test_streamed_reasoning_matches_the_whole_answer(reasoning_server: Server) -> None:
    url = f"{reasoning_server.base_url}/v1/chat/completions"
    whole = httpx.post(url, json=body(), timeout=120).json()["choices"][0]["message"]
    reasoning, content, reasoning_chunks = "", "", 0
    with httpx.stream("POST", url, json=body(stream=True), timeout=120) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                delta = choice["delta"]
                reasoning_chunks += bool(delta.get("reasoning"))
                reasoning += delta.get("reasoning") or ""
                content += delta.get("content") or ""
    streamed = f"reasoning {reasoning!r}, content {content!r}; whole {whole}"
    assert reasoning_chunks >= 2, streamed  # reasoning streamed as it was generated
    assert words(content) == words(whole["content"]), streamed
    # vLLM's granite parser, streaming, may pass a marker's edge (its ":") into the
    # reasoning, as `vllm serve` does; the reasoning itself is all there, in order.
    assert " ".join(words(whole["reasoning"])) in " ".join(words(reasoning)), streamed
    assert THINK not in reasoning + content and ANSWER not in reasoning + content, streamed


def test_the_openai_sdk_sees_the_reasoning_field(reasoning_server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{reasoning_server.base_url}/v1", api_key="local",
                    max_retries=0, timeout=120)
    extra = body()
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=extra["messages"], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"structured_outputs": extra["structured_outputs"]})
    message = reply.choices[0].message
    assert message.model_extra.get("reasoning")
    assert message.content and ANSWER not in message.content
