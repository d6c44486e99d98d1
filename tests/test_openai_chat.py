"""The OpenAI chat surface, end to end: official SDK -> truss server -> vLLM CPU engine.

The tiny model has random weights, so tests assert the protocol (shapes, counts, parsing,
constraints) and determinism, never the meaning of the text.
"""

from __future__ import annotations

import json

import pytest
from conftest import MODEL_NAME
from openai import OpenAI

HELLO = [{"role": "user", "content": "Hello! What is the weather like in Paris today?"}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        # Enums and `strict` keep a random-weight model's arguments short and complete.
        "strict": True,
    },
}


def greedy(client: OpenAI, max_tokens: int = 24, **kwargs):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=max_tokens, temperature=0, **kwargs)


def test_chat_completion_shape_and_usage(client: OpenAI) -> None:
    reply = greedy(client, max_tokens=12, extra_body={"ignore_eos": True})
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_NAME
    assert reply.id
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_greedy_is_deterministic(client: OpenAI) -> None:
    assert greedy(client).choices[0].message.content == greedy(client).choices[0].message.content


def test_streaming_matches_non_streaming_and_reports_usage(client: OpenAI) -> None:
    expected = greedy(client)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == [expected.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the whole request's usage.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_sends_none(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_n_returns_that_many_choices(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=8, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens == 3 * 8
    assert len({c.message.content for c in reply.choices}) > 1


def test_stop_sequence_truncates_output(client: OpenAI) -> None:
    full = greedy(client, max_tokens=40).choices[0].message.content
    ascii_words = [w for w in full.split() if w.isascii() and w.isalnum() and len(w) >= 3]
    assert ascii_words, f"no usable stop word in {full!r}"
    stop = ascii_words[len(ascii_words) // 2][:3]
    reply = greedy(client, max_tokens=40, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[:full.index(stop)]


def test_seed_makes_sampling_reproducible(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=MODEL_NAME, messages=HELLO, max_tokens=24, temperature=1.0,
            seed=seed).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_logprobs_and_top_logprobs(client: OpenAI) -> None:
    reply = greedy(client, max_tokens=10, logprobs=True, top_logprobs=3,
                   extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 10
    for position in content:
        assert len(position.top_logprobs) == 3
        assert position.logprob <= 0
        # Greedy decoding picks the most likely token.
        assert position.logprob == pytest.approx(max(t.logprob for t in position.top_logprobs))
    assert "".join(p.token for p in content) == reply.choices[0].message.content


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_output_length_limits(client: OpenAI, field: str) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, temperature=0, extra_body={"ignore_eos": True},
        **{field: 5})
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_named_tool_choice_returns_schema_valid_call(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, tools=[WEATHER_TOOL], max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = reply.choices[0].message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].type == "function" and calls[0].id
    assert calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert arguments["city"] in ("Paris", "Rome", "Oslo") and arguments["unit"] in ("c", "f")


def test_required_tool_choice_returns_a_call(client: OpenAI) -> None:
    # parallel_tool_calls=False caps the forced array at one call: a random model would
    # otherwise keep appending calls until max_tokens.
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert set(json.loads(choice.message.tool_calls[0].function.arguments)) == {"city", "unit"}


def test_streamed_tool_call_assembles_to_valid_arguments(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=64, stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            name = name or delta.function.name
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather"
    assert json.loads(arguments)["city"] in ("Paris", "Rome", "Oslo")
    assert finish == "tool_calls"


def test_auto_tool_choice_and_tool_result_turn(client: OpenAI) -> None:
    auto = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, tools=[WEATHER_TOOL], tool_choice="auto",
        max_tokens=8)
    assert auto.choices[0].message.role == "assistant"
    forced = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, tools=[WEATHER_TOOL], max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = forced.choices[0].message.tool_calls[0]
    history = [*HELLO,
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    follow_up = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=[WEATHER_TOOL], max_tokens=8)
    assert follow_up.choices[0].message.role == "assistant"
    # The tool call and its result are part of the prompt the template rendered.
    assert follow_up.usage.prompt_tokens > forced.usage.prompt_tokens + 10


def test_response_format_json_schema(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}, "choice": {"enum": ["yes", "no"]},
                       "digit": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "choice", "digit"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=64,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"answer", "choice", "digit"}
    assert isinstance(data["answer"], bool) and data["choice"] in ("yes", "no")
    assert isinstance(data["digit"], int) and 0 <= data["digit"] <= 9


def test_response_format_json_object(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=48, temperature=0,
        response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    # A random model rarely closes the object before max_tokens; what the grammar must
    # guarantee is that the text is JSON-object syntax all the way.
    assert content.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    free = greedy(client, max_tokens=48).choices[0].message.content
    assert not free.startswith("{")
