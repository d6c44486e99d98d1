"""`/v1/completions` and Baseten's `/predict` (same OpenAI bodies), over real HTTP."""

from __future__ import annotations

import json

import httpx
from conftest import MODEL_NAME
from openai import OpenAI

CHAT_BODY = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0,
             "messages": [{"role": "user", "content": "Summarize the queue status."}]}
PREDICT = "/v1/models/model:predict"


def test_completions_with_logprobs_and_echo(client: OpenAI) -> None:
    reply = client.completions.create(model=MODEL_NAME, prompt="The model server", max_tokens=6,
                                      temperature=0, logprobs=2, echo=True,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert reply.object == "text_completion"
    assert choice.text.startswith("The model server")
    assert reply.usage.completion_tokens == 6
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs if top)


def test_completions_stream(client: OpenAI) -> None:
    expected = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=10,
                                         temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None


def test_predict_takes_the_chat_body(http: httpx.Client, client: OpenAI) -> None:
    response = http.post(PREDICT, json=CHAT_BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    via_openai = client.chat.completions.create(**CHAT_BODY)
    assert body["choices"][0]["message"]["content"] == via_openai.choices[0].message.content


def test_predict_takes_a_completions_body(http: httpx.Client) -> None:
    response = http.post(PREDICT, json={"prompt": "Once upon", "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "text_completion"


def test_predict_streams_server_sent_events(http: httpx.Client) -> None:
    with http.stream("POST", PREDICT, json={**CHAT_BODY, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_predict_errors_are_baseten_shaped(http: httpx.Client) -> None:
    bad_json = http.post(PREDICT, content=b"{not json",
                         headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]
    unknown = http.post(PREDICT, json={"input": "hello"})
    assert unknown.status_code == 400
    assert "messages" in unknown.json()["error"]
    too_long = http.post(PREDICT, json={**CHAT_BODY, "max_tokens": 10**9})
    assert too_long.status_code == 400
    assert "max_tokens" in too_long.json()["error"]
