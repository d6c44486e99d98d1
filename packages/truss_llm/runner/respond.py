"""Sending the surface's own answers, each counted by route and status.

`baseten_surface_requests_total` counts every request the surface routes itself (answered
here or forwarded to the model); truss's own routes are counted by the truss server.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from starlette.responses import Response

REQUESTS = Counter("baseten_surface_requests_total", "Requests by route and status code.",
                   ["route", "code"])


def count(route: str, status: int) -> None:
    REQUESTS.labels(route, str(status)).inc()


async def respond(response: Response, scope: dict, receive: Callable, send: Callable,
                  route: str) -> None:
    count(route, response.status_code)
    await response(scope, receive, send)
