"""OpenAI's chat and completions protocol, served by vLLM's own serving classes in-process.

The classes behind `vllm serve` (`OpenAIServingChat`, `OpenAIServingCompletion`) do the
protocol: templates, tool-call parsing, structured outputs, logprobs, usage, SSE. This
module only adapts them to truss routes: it parses the body itself (so that bad JSON gets an
OpenAI-shaped 400 instead of truss's own), adds the checks OpenAI makes and vLLM does not
(roles, empty conversations), races non-streaming work against a client disconnect, and
turns every outcome into a `Response`, because truss makes a 500 of anything raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pydantic
import pydantic_core
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from truss_llm import budget, lora
from truss_llm.admission import Admission
from truss_llm.budget import BudgetSettings, Deadline
from truss_llm.budget_engine import BudgetedEngineClient
from truss_llm.cancellation import ClientDisconnected, run_until_disconnected
from truss_llm.engine import Engine
from truss_llm.errors import (
    RequestError,
    baseten_error,
    engine_unavailable,
    error_from_exception,
    openai_error,
    validate_request,
)
from truss_llm.media.parts import CURRENT_LEASE, MediaResolver, model_modalities
from truss_llm.media.policy import FetchPolicy
from truss_llm.settings import EngineSettings

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# Roles OpenAI's Chat Completions API accepts; vLLM accepts any string by design.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Bodies past this size are decoded off the event loop (a chat request is a few KB).
THREAD_DECODE_BYTES = 1024 * 1024
# Status nginx made conventional for "client closed the request"; nobody reads the body.
CLIENT_CLOSED_REQUEST = 499

ErrorRenderer = Callable[[RequestError], Response]


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; a big one is decoded in a worker thread.

    Both JSON decoders hold the GIL for a whole document, so a thread alone does not free
    the event loop every stream shares: the stall is as long as the decode. Hence the
    faster decoder, and the thread for what it still gives (see benchmarks/body_stall.py)."""
    raw = await request.body()
    if len(raw) > THREAD_DECODE_BYTES:
        return await asyncio.to_thread(decode_json_object, raw)
    return decode_json_object(raw)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    if not raw or raw.isspace():  # isspace stops at the first other byte; strip copies
        raise RequestError("The request body is empty: send a JSON object.")
    try:
        # jiter (pydantic's decoder) reads a 90 MB body in ~40 ms where json takes ~110 ms,
        # and gives the same values. Whatever it refuses (bad JSON, lone surrogates, deep
        # nesting past its 200 levels) is decoded again by json, whose verdict and messages
        # the API keeps.
        body = pydantic_core.from_json(raw)
    except ValueError:
        body = _decode_with_stdlib(raw)
    if not isinstance(body, dict):
        raise RequestError(f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def _decode_with_stdlib(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
        if _may_hold_surrogates(raw):
            _refuse_lone_surrogates(body, "body")
    except ValueError as exc:  # not JSON, not UTF-8, or a number of over 4300 digits
        raise RequestError(f"The request body is not valid JSON ({exc}).") from None
    except RecursionError:
        raise RequestError("The request body is nested too deeply to be read.") from None
    return body


# JSON may spell a UTF-16 surrogate as an escape (and Python's decoder lets one through
# raw): paired, the decoder joins them into one character; alone, the string is not Unicode
# text, and vLLM's engine fails to encode it (a 500).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_hold_surrogates(raw: bytes) -> bool:
    """False for most bodies, at memchr speed (a regex over 90 MB takes seconds): an escape
    `\\uD...` or the UTF-8 lead byte of U+D000-U+DFFF (Hangul too, hence only "may")."""
    return b"\xed" in raw or (b"\\" in raw and (b"\\ud" in raw or b"\\uD" in raw))


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    if isinstance(value, str):
        found = not value.isascii() and _LONE_SURROGATE.search(value)
        if found:
            raise RequestError(f"{where} holds a lone UTF-16 surrogate (U+{ord(found[0]):04X}), "
                               "which is not Unicode text: encode the text as UTF-8.",
                               param=None if where == "body" else where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, where)
            _refuse_lone_surrogates(item, key if where == "body" else f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{index}]")


def check_chat_messages(body: dict[str, Any]) -> None:
    """The checks OpenAI makes before a conversation reaches the model."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise RequestError("'messages' must be an array of message objects.", param="messages")
    if not messages:
        raise RequestError("'messages' must contain at least one message.", param="messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object with a 'role'.", param=param)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(
                f"Invalid value for {param}.role: {role!r}. Supported roles: "
                f"{', '.join(CHAT_ROLES)}.", param=f"{param}.role")
        has_content = message.get("content") is not None
        if role == "assistant":
            if not has_content and not message.get("tool_calls") and not message.get(
                    "function_call"):
                raise RequestError(f"{param}: an assistant message needs 'content' or "
                                   "'tool_calls'.", param=f"{param}.content")
        elif not has_content:
            raise RequestError(f"Missing required parameter: '{param}.content'.",
                               param=f"{param}.content")
        if role == "tool" and not message.get("tool_call_id"):
            raise RequestError(f"Missing required parameter: '{param}.tool_call_id' (the id "
                               "of the assistant tool call this message answers).",
                               param=f"{param}.tool_call_id")


# OpenAI's JSON types for the scalar parameters, checked as OpenAI checks them: vLLM's
# pydantic models are lax and would take "yes" for true and "10" for 10.
_BOOLEAN, _INTEGER, _NUMBER = "a boolean", "an integer", "a number"
_SHARED_TYPES = {"stream": _BOOLEAN, "n": _INTEGER, "seed": _INTEGER,
                 "temperature": _NUMBER, "top_p": _NUMBER, "presence_penalty": _NUMBER,
                 "frequency_penalty": _NUMBER}
CHAT_PARAM_TYPES = {**_SHARED_TYPES, "logprobs": _BOOLEAN, "top_logprobs": _INTEGER,
                    "parallel_tool_calls": _BOOLEAN, "store": _BOOLEAN}
COMPLETION_PARAM_TYPES = {**_SHARED_TYPES, "echo": _BOOLEAN, "logprobs": _INTEGER,
                          "best_of": _INTEGER}
_JSON_TYPE_NAMES = {bool: _BOOLEAN, int: _INTEGER, float: _NUMBER, str: "a string",
                    list: "an array", dict: "an object"}


def _has_json_type(value: Any, expected: str) -> bool:
    if expected == _BOOLEAN:
        return isinstance(value, bool)
    if isinstance(value, bool):  # true is not 1 in JSON
        return False
    if expected == _INTEGER:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)


def check_param_types(body: dict[str, Any], expected_types: dict[str, str]) -> None:
    """A parameter of the wrong JSON type is a 400 naming it (null means "not given")."""
    for name, expected in expected_types.items():
        value = body.get(name)
        if value is not None and not _has_json_type(value, expected):
            got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
            raise RequestError(f"Invalid type for '{name}': expected {expected}, but got "
                               f"{got} instead.", param=name)


def check_token_limits(body: dict[str, Any]) -> None:
    """Name the field the client sent: vLLM reports both spellings as `max_tokens`."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"Invalid '{field}': expected an integer of at least 1, "
                               f"got {value!r}.", param=field)


def _sse(stream: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


class OpenAISurface:
    """Chat and completions endpoints over one engine."""

    def __init__(self, engine: Engine, media_policy: FetchPolicy | None = None,
                 budget_settings: BudgetSettings | None = None) -> None:
        self._engine = engine
        self._media_policy = media_policy or FetchPolicy()
        self._budget = budget_settings or BudgetSettings()
        self._media: MediaResolver | None = None
        self._chat = None
        self._completion = None
        self._models = None
        self._admission: Admission | None = None
        # vLLM's shared serving state, for the other APIs' serving classes (see `serve`).
        self.serving_models = None
        self.renderer = None
        self.engine_client: BudgetedEngineClient | None = None
        self.chat_template: str | None = None
        self.serving_options: dict[str, Any] = {}
        engine.on_ready(self._build_serving)

    @property
    def settings(self) -> EngineSettings:
        return self._engine.settings

    async def _build_serving(self, client: AsyncLLM) -> None:
        """Construct vLLM's serving objects, as `vllm serve`'s `init_app_state` does."""
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer

        settings = self.settings
        # `vllm serve`'s serving options, as its `init_app_state` passes them on.
        serving_options = dict(
            chat_template_content_format=settings.chat_template_content_format,
            enable_auto_tools=settings.enable_auto_tool_choice,
            tool_parser=settings.tool_call_parser,
            reasoning_parser=settings.reasoning_parser,
            default_chat_template_kwargs=settings.default_chat_template_kwargs,
        )
        chat_template = load_chat_template(settings.chat_template)
        # Adapters are served under their own names, picked by the request's `model`.
        models = OpenAIServingModels(
            engine_client=client,
            base_model_paths=[BaseModelPath(name=settings.served_model_name,
                                            model_path=settings.model_path)],
            lora_modules=lora.module_paths(settings.lora_adapters, settings.served_model_name))
        await models.init_static_loras()
        renderer = OnlineRenderer(
            model_config=client.model_config,
            renderer=client.renderer,
            request_logger=None,
            chat_template=chat_template,
            **serving_options,
        )
        renderer.warmup()
        # The serving classes generate through this wrapper, which holds every generation
        # to its request's deadline (see budget_engine).
        budgeted = BudgetedEngineClient(client)
        self._chat = OpenAIServingChat(
            budgeted, models, settings.response_role,
            online_renderer=renderer,
            request_logger=None,
            chat_template=chat_template,
            **serving_options,
            enable_prompt_tokens_details=True,
        )
        self._completion = OpenAIServingCompletion(
            budgeted, models, online_renderer=renderer, request_logger=None,
            enable_prompt_tokens_details=True)
        self._models = models
        self.serving_models, self.renderer, self.engine_client, self.chat_template = (
            models, renderer, budgeted, chat_template)
        self.serving_options = serving_options
        self._admission = Admission(client.vllm_config.scheduler_config.max_num_queued_reqs)
        tokenizer = client.renderer.tokenizer
        self._media = MediaResolver(
            self._media_policy, settings.served_model_name, client.model_config.max_model_len,
            longest_token_chars=max(len(token) for token in tokenizer.get_vocab()),
            modalities=model_modalities(client.model_config))

    async def chat_completions(self, request: Request,
                               render_error: ErrorRenderer | None = None) -> Response:
        return await self._serve(request, self._create_chat, render_error)

    async def completions(self, request: Request,
                          render_error: ErrorRenderer | None = None) -> Response:
        return await self._serve(request, self._create_completion, render_error)

    async def predict(self, request: Request) -> Response:
        """Baseten's `/predict`: the same OpenAI body (chat, or completions with `prompt`)."""
        return await self._serve(request, self._create_for_predict, render_baseten_error)

    async def models(self) -> dict[str, Any]:
        """The `/v1/models` list, as `vllm serve` answers it."""
        await self._engine.ensure_ready()
        listing = await self._models.show_available_models()
        return listing.model_dump()

    async def _create_chat(self, body: dict[str, Any], request: Request):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        check_chat_messages(body)
        check_param_types(body, CHAT_PARAM_TYPES)
        check_token_limits(body)
        body = await self._media.resolve(body, deadline=self._media_deadline())
        parsed = validate_request(ChatCompletionRequest, body)
        usage_requested = _ask_for_usage(parsed)
        result = await self._chat.create_chat_completion(parsed, request)
        return _finish_stream(result, usage_requested, parsed.n or 1)

    async def _create_completion(self, body: dict[str, Any], request: Request):
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        if "prompt" not in body:
            raise RequestError("Missing required parameter: 'prompt'.", param="prompt")
        check_param_types(body, COMPLETION_PARAM_TYPES)
        check_token_limits(body)
        parsed = validate_request(CompletionRequest, body)
        usage_requested = _ask_for_usage(parsed)
        result = await self._completion.create_completion(parsed, request)
        prompts = len(parsed.prompt) if isinstance(parsed.prompt, list) and parsed.prompt \
            and not isinstance(parsed.prompt[0], int) else 1
        return _finish_stream(result, usage_requested, prompts * (parsed.n or 1))

    async def _create_for_predict(self, body: dict[str, Any], request: Request):
        if "messages" in body:
            return await self._create_chat(body, request)
        if "prompt" in body:
            return await self._create_completion(body, request)
        raise RequestError("predict takes an OpenAI chat body ({\"messages\": [...]}) or a "
                           "completions body ({\"prompt\": \"...\"}).")

    @property
    def media(self) -> MediaResolver:
        return self._media

    async def serve(self, request: Request, create, render_error: ErrorRenderer) -> Response:
        """Serve one request of another API (Responses, Anthropic Messages) the way chat is
        served: parsed body, admission, deadline, disconnect race, errors in `render_error`'s
        shape. `create(body, request)` returns an ErrorResponse, a JSON-ready dict or
        pydantic model, or an async iterator of SSE strings."""
        return await self._serve(request, create, render_error)

    def media_deadline(self) -> float:
        return self._media_deadline()

    def _media_deadline(self) -> float:
        """Media fetching is charged to the request's deadline, within the policy's own."""
        own = time.monotonic() + self._media_policy.total_timeout_s
        deadline = budget.current()
        return own if deadline is None else min(own, deadline.at)

    async def _serve(self, request: Request, create, render_error: ErrorRenderer | None
                     ) -> Response:
        arrived = time.monotonic()
        render_error = render_error or render_openai_error
        deadline: Deadline | None = None
        try:
            if not self._engine.alive:
                raise engine_unavailable()
            deadline = budget.deadline_for(request.headers, self._budget, arrived)
            body = await read_json_object(request)
            await self._engine.ensure_ready()
            # Checked and counted with no await between: a burst is counted as it comes.
            self._admission.enter()
            # The task that runs `create` copies this context: the engine wrapper finds the
            # deadline there when vLLM starts the generation.
            token = budget.enter(deadline)
            # Whatever the API, the media its handler resolves count against the replica's
            # budget until the response is sent (media/memory.py).
            lease = self._media.lease()
            lease_token = CURRENT_LEASE.set(lease)
            try:
                # Streams are cancelled by Starlette on disconnect; the rest is raced here.
                result = await run_until_disconnected(create(body, request), request)
            except BaseException:
                self._admission.leave()
                lease.release()
                raise
            finally:
                budget.leave(token)
                CURRENT_LEASE.reset(lease_token)
            result = lease.hold(result)
            if hasattr(result, "__anext__"):
                result = self._admission.until_done(result)
            else:
                self._admission.leave()
        except ClientDisconnected:
            logger.info("client disconnected; engine request aborted")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # a user's mistake or vLLM's refusal: never a bare 500
            return render_error(error_from_exception(exc))
        return self._to_response(result, render_error, deadline)

    @staticmethod
    def _to_response(result: Any, render_error: ErrorRenderer, deadline: Deadline | None
                     ) -> Response:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(result, ErrorResponse):
            info = result.error
            return render_error(RequestError(info.message, info.code, info.param))
        if isinstance(result, pydantic.BaseModel | dict):
            body = result if isinstance(result, dict) else result.model_dump(mode="json")
            body = budget.mark_body(body, deadline)
            return JSONResponse(body, headers=budget.response_headers(deadline, body))
        return _sse(result, budget.response_headers(deadline))


def _ask_for_usage(parsed: Any) -> bool:
    """Make a stream end with vLLM's usage chunk, which carries the budget marker when the
    budget ends the stream; returns whether the client asked for it itself."""
    from vllm.entrypoints.generate.base.protocol import StreamOptions

    options = parsed.stream_options
    requested = bool(options and options.include_usage)
    if parsed.stream and not requested:
        parsed.stream_options = StreamOptions(
            include_usage=True,
            continuous_usage_stats=bool(options and options.continuous_usage_stats))
    return requested


def _finish_stream(result: Any, usage_requested: bool, choices: int) -> Any:
    deadline = budget.current()
    if deadline is None or not hasattr(result, "__anext__"):
        return result
    return budget.finish_stream(result, deadline, usage_requested, choices)


def render_openai_error(error: RequestError) -> Response:
    return openai_error(error.status, error.message, error.param, headers=error.headers)


def render_baseten_error(error: RequestError) -> Response:
    return baseten_error(error.status, error.message, headers=error.headers)
