"""OpenAI's Responses API and Anthropic's Messages API, through the official SDKs, unmodified.

Every test runs against both ways in: the truss server's own routes (`/v1/responses`,
`/v1/messages`) and the runner's Baseten path (`/environments/production/sync/v1/...`).
The tiny model's output is nonsense; what is checked is the protocol: the answer's shape,
streamed events that add up to the answer, schema-valid tool calls and structured output,
errors in each API's own shape, engine work aborted when the client goes, and media parts
in these APIs' shapes resolved by our fetcher.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from conftest import MODEL_NAME, Server, drop_streams_midway, wait_until_idle

TRUSS_ROUTE, SYNC_PATH = "", "/environments/production/sync"
WAYS_IN = pytest.mark.parametrize("prefix", [TRUSS_ROUTE, SYNC_PATH], ids=["truss", "sync"])
# Enums keep a random-weight model's tool arguments and JSON short and complete.
CITY_SCHEMA = {"type": "object",
               "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
               "required": ["city"], "additionalProperties": False}
VERDICT_SCHEMA = {"type": "object",
                  "properties": {"choice": {"enum": ["yes", "no"]},
                                 "digit": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["choice", "digit"], "additionalProperties": False}
QUESTION = "What is the weather like in Paris today?"
NOTES = "Queue status: 12 requests waiting. The weather in Oslo is cold. " * 4


def openai_client(server: Server, prefix: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}{prefix}/v1", api_key="local",
                         max_retries=0, timeout=120)


def anthropic_client(server: Server, prefix: str) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to its base URL.
    return anthropic.Anthropic(base_url=f"{server.base_url}{prefix}", api_key="local",
                               max_retries=0, timeout=120)


# -- Responses ----------------------------------------------------------------------------

@WAYS_IN
def test_responses_create(server: Server, prefix: str) -> None:
    response = openai_client(server, prefix).responses.create(
        model=MODEL_NAME, input=QUESTION, instructions="Be brief.", max_output_tokens=8)
    assert response.object == "response" and response.model == MODEL_NAME
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message"
    assert isinstance(response.output_text, str) and response.output_text
    assert 1 <= response.usage.output_tokens <= 8


@WAYS_IN
def test_responses_stream_adds_up_to_the_answer(server: Server, prefix: str) -> None:
    stream = openai_client(server, prefix).responses.create(
        model=MODEL_NAME, input=QUESTION, max_output_tokens=12, stream=True)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-1].response.output_text


@WAYS_IN
def test_responses_named_tool_call_is_schema_valid(server: Server, prefix: str) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
            "parameters": CITY_SCHEMA, "strict": True}
    response = openai_client(server, prefix).responses.create(
        model=MODEL_NAME, input=QUESTION, tools=[tool], max_output_tokens=64,
        tool_choice={"type": "function", "name": "get_weather"})
    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome", "Oslo")


@WAYS_IN
def test_responses_json_schema_text_format(server: Server, prefix: str) -> None:
    response = openai_client(server, prefix).responses.create(
        model=MODEL_NAME, input=QUESTION, max_output_tokens=48,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT_SCHEMA,
                         "strict": True}})
    data = json.loads(response.output_text)
    assert data["choice"] in ("yes", "no") and 0 <= data["digit"] <= 9


@WAYS_IN
@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL_NAME}, "input"),
    ({"model": MODEL_NAME, "input": "hi", "max_output_tokens": "ten"}, "max_output_tokens"),
    ({"model": MODEL_NAME, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": MODEL_NAME, "input": "hi", "stream": "yes"}, "stream"),
    ({"model": MODEL_NAME, "input": [{"role": "user", "content": 5}]}, None),
])
def test_responses_bad_body_is_a_400_in_openai_shape(server: Server, prefix: str,
                                                     body: dict, param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server, prefix).responses.create(**body)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


@WAYS_IN
def test_responses_malformed_json_and_unknown_model(server: Server, prefix: str) -> None:
    url = f"{server.base_url}{prefix}/v1/responses"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(server, prefix).responses.create(model="no-such-model", input="hi")
    assert caught.value.body["type"] == "not_found_error"


# -- Anthropic Messages -------------------------------------------------------------------

@WAYS_IN
def test_messages_create(server: Server, prefix: str) -> None:
    message = anthropic_client(server, prefix).messages.create(
        model=MODEL_NAME, max_tokens=8, system="Be brief.",
        messages=[{"role": "user", "content": QUESTION}])
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL_NAME
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 8 and message.usage.input_tokens > 0


@WAYS_IN
def test_messages_stream_adds_up_to_the_answer(server: Server, prefix: str) -> None:
    client = anthropic_client(server, prefix)
    with client.messages.stream(model=MODEL_NAME, max_tokens=12,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        deltas = [event.delta.text for event in stream
                  if event.type == "content_block_delta" and event.delta.type == "text_delta"]
        final = stream.get_final_message()
    assert deltas and "".join(deltas) == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens")


@WAYS_IN
def test_messages_forced_tool_use_is_schema_valid(server: Server, prefix: str) -> None:
    message = anthropic_client(server, prefix).messages.create(
        model=MODEL_NAME, max_tokens=64, messages=[{"role": "user", "content": QUESTION}],
        tools=[{"name": "get_weather", "description": "Weather for a city.",
                "input_schema": CITY_SCHEMA}],
        tool_choice={"type": "tool", "name": "get_weather"})
    uses = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert [use.name for use in uses] == ["get_weather"]
    assert uses[0].input["city"] in ("Paris", "Rome", "Oslo")
    # The follow-up turn, with the tool's result, is accepted.
    reply = anthropic_client(server, prefix).messages.create(
        model=MODEL_NAME, max_tokens=4, tools=[{"name": "get_weather",
                                                "input_schema": CITY_SCHEMA}],
        messages=[{"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": [use.model_dump() for use in uses]},
                  {"role": "user", "content": [{"type": "tool_result",
                                                "tool_use_id": uses[0].id,
                                                "content": "18 degrees"}]}])
    assert reply.usage.input_tokens > message.usage.input_tokens


@WAYS_IN
def test_messages_tool_use_cut_by_max_tokens_is_returned_incomplete(server: Server,
                                                                    prefix: str) -> None:
    """The Messages API answers a tool call that max_tokens cut short with an incomplete
    `tool_use` block and stop_reason `max_tokens` (vLLM's converter failed it with a 400
    about JSON)."""
    note = {"type": "object", "properties": {"note": {"type": "string"}},
            "required": ["note"]}
    message = anthropic_client(server, prefix).messages.create(
        model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": QUESTION}],
        tools=[{"name": "take_note", "input_schema": note}],
        tool_choice={"type": "tool", "name": "take_note"})
    assert message.stop_reason == "max_tokens"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [use.name for use in uses] == ["take_note"]
    assert isinstance(uses[0].input, dict)


def test_cut_tool_arguments_keep_what_was_generated() -> None:
    from truss_llm.anthropic_surface import complete_cut_tool_calls
    from vllm.entrypoints.generate.base.protocol import FunctionCall, ToolCall

    def call(arguments: str) -> ToolCall:
        return ToolCall(function=FunctionCall(name="f", arguments=arguments))

    whole = [call('{"city": "Paris"}')]
    assert complete_cut_tool_calls(whole) is False
    assert whole[0].function.arguments == '{"city": "Paris"}'
    cut = [call('{"city": "Paris"}'), call('{"a": 1, "b": [1, 2'), call('{"note": "Par'),
           call(""), call("[1, 2")]
    assert complete_cut_tool_calls(cut) is True
    assert [json.loads(c.function.arguments) for c in cut] == [
        {"city": "Paris"}, {"a": 1, "b": [1, 2]}, {"note": "Par"}, {}, {}]


@WAYS_IN
@pytest.mark.parametrize("body", [
    {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]},  # no max_tokens
    {"model": MODEL_NAME, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL_NAME, "max_tokens": "8", "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL_NAME, "max_tokens": 8, "messages": [{"role": "robot", "content": "hi"}]},
    {"model": MODEL_NAME, "max_tokens": 8},
])
def test_messages_bad_body_is_a_400_in_anthropic_shape(server: Server, prefix: str,
                                                       body: dict) -> None:
    response = httpx.post(f"{server.base_url}{prefix}/v1/messages", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


@WAYS_IN
def test_messages_errors_reach_the_sdk_as_its_own(server: Server, prefix: str) -> None:
    client = anthropic_client(server, prefix)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "not_found_error"
    bad = httpx.post(f"{server.base_url}{prefix}/v1/messages", content=b"[1, 2",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_runner_errors_take_each_apis_shape(server: Server) -> None:
    unknown = f"{server.base_url}/environments/no-such-env/sync/v1"
    message = httpx.post(f"{unknown}/messages", json={}, timeout=30)
    assert message.status_code == 404
    assert message.json()["type"] == "error"
    assert message.json()["error"]["type"] == "not_found_error"
    response = httpx.post(f"{unknown}/responses", json={}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


def test_requests_are_counted_in_the_metrics(server: Server) -> None:
    """The runner counts each sync request by status; vLLM counts the engine's work."""
    ok, bad = ('baseten_surface_requests_total{code="200",route="openai"}',
               'baseten_surface_requests_total{code="400",route="openai"}')
    before = server.metrics()
    sync = f"{server.base_url}{SYNC_PATH}/v1"
    assert httpx.post(f"{sync}/responses", timeout=60, json={
        "model": MODEL_NAME, "input": "hi", "max_output_tokens": 2}).status_code == 200
    assert httpx.post(f"{sync}/messages", timeout=60, json={
        "model": MODEL_NAME, "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert httpx.post(f"{sync}/messages", timeout=60, json={"model": MODEL_NAME}
                      ).status_code == 400
    after = server.metrics()
    assert after[ok] - before.get(ok, 0) == 2 and after[bad] - before.get(bad, 0) == 1
    assert server.metric("vllm:request_success_total") >= 2


# -- disconnects --------------------------------------------------------------------------

LONG_RESPONSE = {"model": MODEL_NAME, "input": "Write a very long story.",
                 "max_output_tokens": 400, "temperature": 1.0}
LONG_MESSAGE = {"model": MODEL_NAME, "max_tokens": 400,
                "messages": [{"role": "user", "content": "Write a very long story."}]}
CONCURRENT = 4


@pytest.mark.parametrize(("path", "body"), [("/v1/responses", LONG_RESPONSE),
                                            ("/v1/messages", LONG_MESSAGE)])
def test_streaming_disconnect_aborts(server: Server, path: str, body: dict) -> None:
    wait_until_idle(server)
    drop_streams_midway(server, path, body, CONCURRENT)
    wait_until_idle(server)


@pytest.mark.parametrize(("path", "body"), [("/v1/responses", LONG_RESPONSE),
                                            ("/v1/messages", LONG_MESSAGE)])
def test_non_streaming_disconnect_aborts(server: Server, path: str, body: dict) -> None:
    wait_until_idle(server)
    before = server.metric("vllm:generation_tokens_total")
    timeouts: list[bool] = []

    def call() -> None:
        try:  # the read timeout is the disconnect: httpx closes the connection
            httpx.post(f"{server.base_url}{path}", json=body, timeout=0.3)
            timeouts.append(False)
        except httpx.TimeoutException:
            timeouts.append(True)

    threads = [threading.Thread(target=call) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_until_idle(server)
    # Requests that outlived their client stopped generating when it went.
    generated = server.metric("vllm:generation_tokens_total") - before
    assert sum(timeouts) >= 1
    assert generated < CONCURRENT * 400


# -- media --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def document_url() -> Iterator[str]:
    """A text document on 127.0.0.1, which the session server may fetch."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/notes.txt":
                self.send_error(404)
                return
            body = NOTES.encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/notes.txt"
    httpd.shutdown()
    httpd.server_close()


def _responses_prompt_tokens(client: openai.OpenAI, content: list[dict]) -> int:
    response = client.responses.create(model=MODEL_NAME, max_output_tokens=1,
                                       input=[{"role": "user", "content": content}])
    return response.usage.input_tokens


@WAYS_IN
def test_responses_input_file_is_fetched_and_inlined(server: Server, prefix: str,
                                                     document_url: str) -> None:
    client = openai_client(server, prefix)
    question = {"type": "input_text", "text": "Summarise."}
    alone = _responses_prompt_tokens(client, [question])
    by_url = _responses_prompt_tokens(client, [question, {
        "type": "input_file", "file_url": document_url, "filename": "notes.txt"}])
    inline = _responses_prompt_tokens(client, [question, {
        "type": "input_file", "filename": "notes.txt",
        "file_data": base64.b64encode(NOTES.encode()).decode()}])
    assert by_url == inline > alone + 40


@WAYS_IN
def test_messages_document_is_fetched_and_inlined(server: Server, prefix: str,
                                                  document_url: str) -> None:
    client = anthropic_client(server, prefix)

    def input_tokens(content: list[dict]) -> int:
        return client.messages.create(model=MODEL_NAME, max_tokens=1, messages=[
            {"role": "user", "content": content}]).usage.input_tokens

    question = {"type": "text", "text": "Summarise."}
    alone = input_tokens([question])
    by_url = input_tokens([question, {"type": "document", "title": "notes.txt",
                                      "source": {"type": "url", "url": document_url}}])
    as_text = input_tokens([question, {"type": "document", "title": "notes.txt", "source": {
        "type": "text", "media_type": "text/plain", "data": NOTES}}])
    assert by_url == as_text > alone + 40


@WAYS_IN
def test_media_errors_name_the_part_in_each_api(server: Server, prefix: str,
                                                document_url: str) -> None:
    # The tiny model takes text only: an image is refused before anything is fetched.
    image = f"{document_url}?image.png"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server, prefix).responses.create(
            model=MODEL_NAME, max_output_tokens=1, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": image}]}])
    assert caught.value.body["param"].startswith("input[0].content[1]")
    assert "does not take image" in caught.value.body["message"]
    missing = document_url.replace("notes.txt", "missing.txt")
    for block, status in (
            ({"type": "document", "source": {"type": "url", "url": missing}}, 422),
            ({"type": "document", "source": {"type": "url", "url": "ftp://127.0.0.1/x"}}, 400),
            ({"type": "image", "source": {"type": "url", "url": image}}, 400),
            ({"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}, 400)):
        response = httpx.post(f"{server.base_url}{prefix}/v1/messages", timeout=60, json={
            "model": MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": [
                block, {"type": "text", "text": "hi"}]}]})
        assert response.status_code == status, response.text
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "messages[0].content[0]" in body["error"]["message"]
