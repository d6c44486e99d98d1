"""OpenAI's Responses API (`POST /v1/responses`), served by vLLM's `OpenAIServingResponses`.

vLLM's class does the protocol (input items, instructions, tools, `text.format` structured
output, the streamed event sequence); it shares the chat route's engine wrapper (so the
budget holds every generation to its deadline), model list (adapters included) and
renderer. The request goes through the chat route's machinery (`OpenAISurface.serve`):
admission, disconnect race, and OpenAI-shaped errors, never a bare 500.

Responses are not stored (vLLM's default, as `vllm serve` without
`VLLM_ENABLE_RESPONSES_API_STORE`): `store` is accepted and ignored, `background` and
`previous_response_id` are refused with a 400/404 that says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from truss_llm import budget
from truss_llm.api_media import resolve_responses_input
from truss_llm.engine import Engine
from truss_llm.errors import RequestError, validate_request
from truss_llm.openai_surface import (
    OpenAISurface,
    check_param_types,
    render_openai_error,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

_BOOLEAN, _INTEGER, _NUMBER = "a boolean", "an integer", "a number"
# OpenAI's JSON types for the Responses API's scalar parameters (vLLM's models are lax).
RESPONSES_PARAM_TYPES = {
    "stream": _BOOLEAN, "store": _BOOLEAN, "background": _BOOLEAN,
    "parallel_tool_calls": _BOOLEAN, "max_output_tokens": _INTEGER,
    "max_tool_calls": _INTEGER, "top_logprobs": _INTEGER, "temperature": _NUMBER,
    "top_p": _NUMBER,
}


# The event that ends a streamed answer: the budget's marker goes there.
RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})


class ResponsesSurface:
    """`/v1/responses` over the engine and the serving state of an `OpenAISurface`."""

    def __init__(self, surface: OpenAISurface, engine: Engine) -> None:
        self._surface = surface
        self._serving = None
        engine.on_ready(self._build_serving)  # after the surface's own set-up

    async def _build_serving(self, client: AsyncLLM) -> None:
        from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

        surface = self._surface
        self._serving = OpenAIServingResponses(
            surface.engine_client, surface.serving_models, surface.renderer,
            request_logger=None,
            chat_template=surface.chat_template,
            **surface.serving_options,  # the chat route's: parsers, template options
            enable_prompt_tokens_details=True,
        )

    async def responses(self, request: Request) -> Response:
        return await self._surface.serve(request, self._create, render_openai_error)

    async def _create(self, body: dict[str, Any], request: Request) -> Any:
        from vllm.entrypoints.openai.responses.protocol import (
            ResponsesRequest,
            ResponsesResponse,
        )

        if body.get("input") is None:
            raise RequestError("Missing required parameter: 'input'.", param="input")
        check_param_types(body, RESPONSES_PARAM_TYPES)
        limit = body.get("max_output_tokens")
        if limit is not None and limit < 1:
            raise RequestError(f"Invalid 'max_output_tokens': expected an integer of at "
                               f"least 1, got {limit!r}.", param="max_output_tokens")
        # The media bytes count against the request's lease (set by `serve`) until the
        # answer is sent.
        body = await resolve_responses_input(self._surface.media, body,
                                             self._surface.media_deadline())
        parsed = validate_request(ResponsesRequest, body)
        result = await self._serving.create_responses(parsed, request)
        if isinstance(result, ResponsesResponse):
            return result.model_dump(mode="json", by_alias=True)  # `schema`, not `schema_`
        if hasattr(result, "__anext__"):
            return _marked(_sse_events(result), RESPONSES_FINAL_EVENTS)
        return result  # an ErrorResponse


def _marked(stream: AsyncIterator[str], final_events: frozenset[str]) -> AsyncIterator[str]:
    """The stream held to the request's deadline, its final event marked if that ended it."""
    deadline = budget.current()
    if deadline is None:
        return stream
    return budget.mark_final_event(budget.within(stream, deadline), deadline, final_events)


async def _sse_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Responses stream events as SSE, each named by its type (as `vllm serve` sends them)."""
    async for event in events:
        kind = getattr(event, "type", "unknown")
        yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
