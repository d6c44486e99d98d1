"""Calls into the truss app, in-process: a direct ASGI call (with a rewritten path for
Baseten's routes), so there is no socket and no proxy hop, and a stream passes straight
through. Every HTTP request that reaches the truss app goes through here.

Every call that runs the model holds `lifecycle.active()` for as long as it runs, so that
scale to zero never unloads the model under it, and waits for a model that is waking.
Limits are enforced where Baseten enforces them: 413 for a body over 100 MB, 504 past the
sync timeout (an SSE error event once a stream has begun).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Histogram
from starlette.responses import Response

from truss_llm import budget
from truss_llm.cancellation import ClientDisconnected
from truss_llm.errors import sse_error_event
from truss_llm.runner import routes
from truss_llm.runner.body import BodyTooLarge, read_body, replaying
from truss_llm.runner.lifecycle import ModelLifecycle, WakeTimeout
from truss_llm.runner.respond import count, renderer_for, respond
from truss_llm.runner.routes import TRUSS_PREDICT
from truss_llm.runner.settings import RunnerSettings

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
ErrorRenderer = Callable[[int, str], Response]

SYNC_LATENCY = Histogram("baseten_surface_sync_seconds", "Sync predict and OpenAI latency "
                         "to the first response byte.", ["route"])

_BUDGET_HEADERS = (budget.KIND_HEADER.encode(), budget.BUDGET_HEADER.encode())


def json_post_scope(path: str, body: bytes, port: int,
                    extra_headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    """The ASGI scope of a local `POST path` with a JSON body, for in-process calls."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *(extra_headers or [])],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", port)}


def budget_headers(headers: list[tuple[bytes, bytes]], kind: str, seconds: float
                   ) -> list[tuple[bytes, bytes]]:
    """Tell the model which budget a request runs under and how much of it is left (what
    the client asked for, if shorter): the model then ends its answer in time, before our
    own timeout has to."""
    asked = dict(headers).get(_BUDGET_HEADERS[1])
    try:
        seconds = min(seconds, float(asked)) if asked is not None else seconds
    except ValueError:
        pass  # the model answers a malformed value with a 400 naming it
    kept = [(name, value) for name, value in headers if name not in _BUDGET_HEADERS]
    return [*kept, (_BUDGET_HEADERS[0], kind.encode()),
            (_BUDGET_HEADERS[1], f"{seconds:.3f}".encode())]


def one_body_receive(body: bytes, until: Callable[[], Awaitable[object]]) -> Callable:
    """An ASGI `receive` for an in-process call: the whole body once, then, after `until()`
    returns, a disconnect."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await until()
        return {"type": "http.disconnect"}

    return receive


class TrussCaller:
    """The three ways a request reaches the model: a Baseten sync route, an async job, and
    the truss app's own model routes called directly."""

    def __init__(self, truss_app: ASGIApp, lifecycle: ModelLifecycle,
                 settings: RunnerSettings) -> None:
        self.truss_app = truss_app
        self.lifecycle = lifecycle
        self.settings = settings

    async def sync(self, scope: dict, receive: Callable, send: Callable, path: str,
                   route: str, render: ErrorRenderer) -> None:
        """A sync route (predict, `.../sync/v1/...`): the truss app's `path`, under the body
        limit and the sync timeout, with the model told its budget."""
        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            await respond(render(413, str(exc)), scope, receive, send, route)
            return
        except ClientDisconnected:
            return
        inner = {**scope, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": self._budget_headers(scope["headers"], "sync")}
        started = time.monotonic()
        status: list[int] = []
        streaming: list[bool] = []

        async def send_through(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                streaming.append(any(name == b"content-type" and b"event-stream" in value
                                     for name, value in message.get("headers", ())))
                SYNC_LATENCY.labels(route).observe(time.monotonic() - started)
            await send(message)

        try:
            async with asyncio.timeout(self.settings.sync_timeout_s):
                async with self.lifecycle.active():
                    await self.truss_app(inner, replaying(body, receive), send_through)
        except WakeTimeout as exc:
            if not status:
                await respond(render(503, str(exc)), scope, receive, send, route)
            return
        except TimeoutError:
            if status:  # already answering: end the response, as an error if we can
                logger.warning("sync request passed %.0f s mid-response; ending it",
                               self.settings.sync_timeout_s)
                # An SSE error event, not a clean close (the model's own budget should
                # have ended it first; this is the last resort).
                last = sse_error_event(504, self._timeout_message()) if streaming[0] else b""
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": last,
                                "more_body": False})
                return
            await respond(render(504, self._timeout_message()), scope, receive, send, route)
            return
        count(route, status[0] if status else 0)

    async def passthrough(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The truss app's own routes, called directly: under the body limit like every
        route, and, for those that run the model (`routes.reaches_model`), counted as
        activity, so that scale to zero cannot stop the engine under a live stream, and
        waiting for a model that is waking."""
        path = scope["path"]
        render = renderer_for(path)
        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            await respond(render(413, str(exc)), scope, receive, send, "truss")
            return
        except ClientDisconnected:
            return
        if not routes.reaches_model(path, scope["method"]):
            await self.truss_app(scope, replaying(body, receive), send)
            return
        try:
            async with self.lifecycle.active():
                await self.truss_app(scope, replaying(body, receive), send)
        except WakeTimeout as exc:  # raised before the model was called: nothing sent yet
            body.close()
            await respond(render(503, str(exc)), scope, receive, send, "truss")

    async def call_model(self, model_input: bytes) -> tuple[int, bytes]:
        """Run one async job through the truss predict route: (status, body)."""
        scope = json_post_scope(TRUSS_PREDICT, model_input, self.settings.port,
                                self._budget_headers([], "async"))
        done = asyncio.Event()
        status = 0
        chunks: list[bytes] = []
        # Nobody disconnects from an async job before it is done.
        receive = one_body_receive(model_input, done.wait)

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        try:
            async with self.lifecycle.active():
                await self.truss_app(scope, receive, send)
        finally:
            done.set()
        return status, b"".join(chunks)

    def _budget_headers(self, headers: list[tuple[bytes, bytes]], kind: str
                        ) -> list[tuple[bytes, bytes]]:
        if not self.settings.forward_budget:
            return headers
        seconds = self.settings.sync_timeout_s if kind == "sync" else \
            self.settings.async_run_timeout_s
        return budget_headers(headers, kind, seconds)

    def _timeout_message(self) -> str:
        return (f"The request did not finish within the {self.settings.sync_timeout_s:g} s "
                "sync timeout. Use async_predict for long work.")
