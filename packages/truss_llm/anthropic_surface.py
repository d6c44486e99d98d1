"""Anthropic's Messages API (`POST /v1/messages`), served by vLLM's `AnthropicServingMessages`.

vLLM's class translates a Messages request into a chat completion (system prompt, content
blocks, `tool_use`/`tool_result`, `tool_choice`), runs it through its chat serving code and
translates the answer back, streamed events included. It gets the chat route's engine
wrapper, model list and renderer, and the request goes through the chat route's machinery
(`OpenAISurface.serve`). Errors leave in Anthropic's own shape,
`{"type": "error", "error": {"type": ..., "message": ...}}`, with the status the
Anthropic SDK maps to its exception classes. A tool call that `max_tokens` (or a stop
sequence) cut short comes back as an incomplete `tool_use` block with that stop reason, as
the Messages API returns it, rather than failing the answer (`complete_cut_tool_calls`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pydantic_core
from starlette.requests import Request
from starlette.responses import Response

from truss_llm import budget
from truss_llm.api_media import resolve_anthropic_messages
from truss_llm.engine import Engine
from truss_llm.errors import RequestError, anthropic_error, validate_request
from truss_llm.openai_surface import OpenAISurface, check_param_types

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

_BOOLEAN, _INTEGER, _NUMBER = "a boolean", "an integer", "a number"
# The Messages API's JSON types for its scalar parameters (vLLM's models are lax).
MESSAGES_PARAM_TYPES = {"stream": _BOOLEAN, "max_tokens": _INTEGER, "top_k": _INTEGER,
                        "temperature": _NUMBER, "top_p": _NUMBER}


def render_anthropic_error(error: RequestError) -> Response:
    return anthropic_error(error.status, error.message, headers=error.headers)


def complete_cut_tool_calls(tool_calls: list[Any]) -> bool:
    """Make the arguments of tool calls that `max_tokens` or a stop sequence cut short
    valid JSON again, keeping what was generated; True if any was cut.

    vLLM's Messages converter `json.loads` every call's arguments, so a cut one used to
    fail the whole answer with a 400 naming a JSON error ("Unterminated string ..."). The
    Messages API returns such a call as an incomplete `tool_use` block, with the stop
    reason that cut it, for the client to retry with more room."""
    cut = False
    for call in tool_calls:
        try:
            json.loads(call.function.arguments)
        except ValueError:
            cut = True
            try:
                partial = pydantic_core.from_json(call.function.arguments or "{}",
                                                  allow_partial="trailing-strings")
            except ValueError:
                partial = {}
            call.function.arguments = json.dumps(partial if isinstance(partial, dict) else {})
    return cut


def _messages_serving_class() -> type:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    class MessagesServing(AnthropicServingMessages):
        def messages_full_converter(self, generator: Any) -> Any:
            choice = generator.choices[0]
            cut = complete_cut_tool_calls(choice.message.tool_calls)
            result = super().messages_full_converter(generator)
            # vLLM takes calls that parse for complete ones, so a call a stop sequence cut
            # would read `tool_use` (run it): it must read `stop_sequence`.
            if cut and choice.finish_reason != "length" and isinstance(choice.stop_reason, str):
                result.stop_reason, result.stop_sequence = "stop_sequence", choice.stop_reason
            return result

    return MessagesServing


class AnthropicSurface:
    """`/v1/messages` over the engine and the serving state of an `OpenAISurface`."""

    def __init__(self, surface: OpenAISurface, engine: Engine) -> None:
        self._surface = surface
        self._serving = None
        engine.on_ready(self._build_serving)  # after the surface's own set-up

    async def _build_serving(self, client: AsyncLLM) -> None:
        surface, settings = self._surface, self._surface.settings
        self._serving = _messages_serving_class()(
            surface.engine_client, surface.serving_models, settings.response_role,
            online_renderer=surface.renderer,
            request_logger=None,
            chat_template=surface.chat_template,
            **surface.serving_options,  # the chat route's: parsers, template options
            enable_prompt_tokens_details=True,
        )

    async def messages(self, request: Request) -> Response:
        return await self._surface.serve(request, self._create, render_anthropic_error)

    async def _create(self, body: dict[str, Any], request: Request) -> Any:
        from vllm.entrypoints.anthropic.protocol import (
            AnthropicMessagesRequest,
            AnthropicMessagesResponse,
        )

        check_param_types(body, MESSAGES_PARAM_TYPES)
        limit = body.get("max_tokens")
        if limit is not None and limit < 1:
            raise RequestError(f"max_tokens: expected an integer of at least 1, got "
                               f"{limit!r}.", param="max_tokens")
        # The media bytes count against the request's lease (set by `serve`) until the
        # answer is sent.
        body = await resolve_anthropic_messages(self._surface.media, body,
                                                self._surface.media_deadline())
        parsed = validate_request(AnthropicMessagesRequest, body)
        result = await self._serving.create_messages(parsed, request)
        if isinstance(result, AnthropicMessagesResponse):
            return result.model_dump(mode="json", exclude_none=True)
        deadline = budget.current()
        if deadline is not None and hasattr(result, "__anext__"):
            # The marker goes where a stream's stop_reason and usage are.
            return budget.mark_final_event(result, deadline, frozenset({"message_delta"}))
        return result  # SSE strings, or an ErrorResponse
