"""Tool calling as a new user tries it with the OpenAI SDK, on the tiny model (issue 12 item 5).

A realistic round trip: a system prompt, two tools, a forced call, then the follow-up turn
with the assistant's `tool_calls` and the `tool` message, which renders the tools section of
the template again. And `tool_choice: "required"` with the request as a user writes it (no
`parallel_tool_calls`), which `vllm serve` answers with calls on the same model.
"""

from __future__ import annotations

import json

from conftest import MODEL_NAME
from openai import OpenAI

SYSTEM = {"role": "system",
          "content": "You are a helpful travel assistant. Use the tools when they help."}
QUESTION = {"role": "user", "content": "What is the weather like in Paris today, and are "
            "there flights from CDG to FCO next Friday for two of us?"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False},
    "strict": True}}
FLIGHTS = {"type": "function", "function": {
    "name": "search_flights",
    "description": "Search flights between two airports on a date, cheapest first.",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "enum": ["CDG", "FCO", "OSL"],
                   "description": "IATA code of the departure airport"},
        "destination": {"type": "string", "enum": ["CDG", "FCO", "OSL"],
                        "description": "IATA code of the arrival airport"},
        "passengers": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["origin", "destination", "passengers"], "additionalProperties": False},
    "strict": True}}
TOOLS = [WEATHER, FLIGHTS]
# The tiny model's old 512-token context could not hold the follow-up turn below.
OLD_CPU_CONTEXT = 512
# Room for the few calls a random model makes before it closes the forced array.
CALLS_ROOM = 400


def test_named_tool_choice_round_trip_with_the_follow_up_turn(client: OpenAI) -> None:
    messages = [SYSTEM, QUESTION]
    forced = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "search_flights"}})
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "search_flights"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"origin", "destination", "passengers"}

    history = [*messages,
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"flights": [{"number": "AF1404", "price_eur": 142},
                                                   {"number": "AZ317", "price_eur": 168}]})}]
    follow_up = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=16)
    assert follow_up.choices[0].message.role == "assistant"
    assert follow_up.usage.prompt_tokens > OLD_CPU_CONTEXT
    # The tool call and its result were rendered into the prompt.
    assert follow_up.usage.prompt_tokens > forced.usage.prompt_tokens + 40


def _assert_valid_calls(calls) -> None:
    assert calls, "no tool call parsed"
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for call in calls:
        assert call.id and call.type == "function"
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == set(schemas[call.function.name]["required"])


def test_required_tool_choice_yields_a_call_without_parallel_tool_calls(client: OpenAI) -> None:
    # As a user writes it: no max_tokens, no parallel_tool_calls. The forced array of calls
    # then has the rest of the context; the random model closes it after two or three calls
    # (~90 tokens each time on `vllm serve` too). The old 512-token context could not even
    # hold this prompt.
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=[SYSTEM, QUESTION], tools=TOOLS, tool_choice="required",
        temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    _assert_valid_calls(choice.message.tool_calls)
    assert reply.usage.prompt_tokens > OLD_CPU_CONTEXT


def test_required_tool_choice_streams_a_call_without_parallel_tool_calls(
        client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[SYSTEM, QUESTION], tools=TOOLS, tool_choice="required",
        max_tokens=CALLS_ROOM, temperature=0, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls
    for call in calls.values():
        assert call["name"] in ("get_weather", "search_flights")
        json.loads(call["arguments"])
