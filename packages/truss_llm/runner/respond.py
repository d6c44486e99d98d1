"""Sending the surface's own answers, each counted by route and status.

`baseten_surface_requests_total` counts every request the surface routes itself (answered
here or forwarded to the model); truss's own routes are counted by the truss server.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from starlette.responses import Response

from truss_llm.errors import baseten_error, error_renderer_for
from truss_llm.runner import routes

REQUESTS = Counter("baseten_surface_requests_total", "Requests by route and status code.",
                   ["route", "code"])


def count(route: str, status: int) -> None:
    REQUESTS.labels(route, str(status)).inc()


async def respond(response: Response, scope: dict, receive: Callable, send: Callable,
                  route: str) -> None:
    count(route, response.status_code)
    await response(scope, receive, send)


def renderer_for(path: str) -> Callable[..., Response]:
    """The error shape of a route the runner answers for: OpenAI's (Anthropic's on Messages)
    on the OpenAI-style routes, direct or under `.../sync`; Baseten's on the others, truss's
    predict included (`error_renderer_for` alone would give it OpenAI's, for its `/v1/`)."""
    if "/sync/v1/" in path or routes.is_openai_path(path):
        return error_renderer_for(path)
    return baseten_error
