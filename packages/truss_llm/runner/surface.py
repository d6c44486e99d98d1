"""Baseten's endpoint surface, in front of the truss server on the same port.

An ASGI app that answers Baseten's routes (predict, async_predict, async_request, queue
status, wake, the `.../sync/v1/...` OpenAI base path) and hands everything else to the truss
server's own app unchanged. Sync calls reach the truss app in-process, as a direct ASGI call
with a rewritten path: no socket, no proxy hop, and streaming passes straight through.
Limits are enforced where Baseten enforces them: 413 for a body over 100 MB, 504 past the
sync timeout, the 256 KiB async input cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from starlette.responses import JSONResponse, Response

from truss_llm import budget
from truss_llm.errors import describe_validation_error
from truss_llm.media.policy import FetchError
from truss_llm.runner import routes, webhooks
from truss_llm.runner.body import BodyTooLarge, ClientGone, read_body, replaying
from truss_llm.runner.lifecycle import ModelLifecycle, WakeTimeout
from truss_llm.runner.models import AsyncPredictRequest
from truss_llm.runner.queue import AsyncQueue, PayloadTooLargeError, QueueFullError
from truss_llm.runner.settings import RunnerSettings
from truss_llm.runner.worker import AsyncWorker

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
TRUSS_PREDICT = "/v1/models/model:predict"
ASYNC_REQUEST_PREFIX = "/async_request/"
MODELS_PREFIX = "/v1/models/"
TRUSS_MODEL_NAME = "model"  # truss's readiness probe asks for /v1/models/model
WS_POLICY_VIOLATION = 1008  # RFC 6455's close code for a refused client

REQUESTS = Counter("baseten_surface_requests_total", "Requests by route and status code.",
                   ["route", "code"])
SYNC_LATENCY = Histogram("baseten_surface_sync_seconds", "Sync predict and OpenAI latency "
                         "to the first response byte.", ["route"])


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


_BUDGET_HEADERS = (budget.KIND_HEADER.encode(), budget.BUDGET_HEADER.encode())


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


def sse_error_event(status: int, message: str) -> bytes:
    """An error in a stream, as vLLM sends one (the OpenAI SDK raises it as an APIError)."""
    error = {"error": {"message": message, "type": _OPENAI_ERROR_TYPES.get(
        status, "invalid_request_error"), "param": None, "code": status}}
    return f"data: {json.dumps(error)}\n\n".encode()


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


def baseten_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


_OPENAI_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error",
                       413: "invalid_request_error", 504: "timeout_error"}


def openai_error(status: int, message: str) -> JSONResponse:
    kind = _OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status_code=status)


class BasetenSurface:
    def __init__(self, truss_app: ASGIApp, model_wrapper: Any, settings: RunnerSettings) -> None:
        self.truss_app = truss_app
        self.settings = settings
        self.lifecycle = ModelLifecycle(model_wrapper, settings.scale_to_zero_idle_s,
                                        settings.wake_timeout_s)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.queue = AsyncQueue(settings.queue_path, settings.model_id, settings.deployment_id)
        self.worker = AsyncWorker(self.queue, settings, self._call_model)
        _export_queue_depth(self.queue)
        self._tasks: list[asyncio.Task] = []

    # -- ASGI entry -------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] == "websocket" and not self._authorized(scope):
            # Closing before accepting makes the server answer the handshake with a 403.
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            await self.truss_app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if not self._authorized(scope):
            route = "openai" if "/v1/" in path else "baseten"
            render = openai_error if route == "openai" else baseten_error
            await self._respond(render(401, "Missing or invalid API key: send the header "
                                            "'Authorization: Api-Key <key>'."),
                                scope, receive, send, "auth")
            return
        if path == "/v1/models" and method == "GET":
            await self._respond(await self._models(), scope, receive, send, "models")
            return
        if path.startswith(MODELS_PREFIX) and method == "GET" and self.lifecycle.loaded:
            # `/v1/models/{id}` is also truss's readiness route (probes ask for "model", and
            # must never wait for a load): answer OpenAI's retrieve only for a served name.
            name = path[len(MODELS_PREFIX):]
            model = await self._model_card(name, wake=False)
            if model is None and name != TRUSS_MODEL_NAME and "/" not in name:
                # Not the probe's name, not a served one: OpenAI's 404, not truss's `{}`,
                # which the OpenAI SDK would take for a model with no fields.
                model = openai_error(404, f"The model `{name}` does not exist.")
            if model is not None:
                await self._respond(model, scope, receive, send, "models")
                return
        if path.startswith(ASYNC_REQUEST_PREFIX):
            request_id = path[len(ASYNC_REQUEST_PREFIX):]
            await self._respond(await self._async_request(request_id, method), scope, receive,
                                send, "async_request")
            return
        found = routes.match(path)
        if found is None:
            await self.truss_app(scope, receive, send)  # truss's own routes, unchanged
            return
        await self._dispatch(found, scope, receive, send)

    async def _dispatch(self, found: routes.Match, scope: dict, receive: Callable,
                        send: Callable) -> None:
        method, action = scope["method"], found.action
        if found.target is not None:
            try:
                routes.check_target(found.target, self.settings)
            except routes.UnknownTarget as exc:
                render = openai_error if action.startswith("/sync/v1/") else baseten_error
                await self._respond(render(404, str(exc)), scope, receive, send, "unknown")
                return
        environment = found.target.name if found.target else "production"
        if action.startswith(routes.SYNC_PREFIX + "/v1/"):
            openai_path = action[len(routes.SYNC_PREFIX):]
            if openai_path == "/v1/models" and method == "GET":
                await self._respond(await self._models(), scope, receive, send, "models")
            elif openai_path.startswith(MODELS_PREFIX) and method == "GET":
                name = openai_path[len(MODELS_PREFIX):]
                card = await self._model_card(name)
                await self._respond(card or openai_error(
                    404, f"The model `{name}` does not exist."), scope, receive, send, "models")
            else:
                await self._forward(scope, receive, send, openai_path, "openai", openai_error)
            return
        expected = routes.ACTIONS.get(action)
        if expected is None or expected != method:
            await self._respond(baseten_error(
                404 if expected is None else 405,
                f"No route {method} {scope['path']}. Routes: POST .../predict, "
                "POST .../async_predict, GET .../async_queue_status, POST .../wake, "
                "POST .../sync/v1/chat/completions, GET/DELETE /async_request/{id}."),
                scope, receive, send, "unknown")
            return
        if action == "/predict":
            await self._forward(scope, receive, send, TRUSS_PREDICT, "predict", baseten_error)
        elif action == "/async_predict":
            await self._respond(await self._async_predict(scope, receive, environment),
                                scope, receive, send, "async_predict")
        elif action == "/async_queue_status":
            await self._respond(await self._queue_status(), scope, receive, send,
                                "async_queue_status")
        elif action == "/wake":
            await self.lifecycle.wake()
            await self._respond(JSONResponse({}, status_code=202), scope, receive, send, "wake")

    # -- sync: forward to the truss app in-process --------------------------------------------
    async def _forward(self, scope: dict, receive: Callable, send: Callable, path: str,
                       route: str, render: Callable[[int, str], Response]) -> None:
        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            await self._respond(render(413, str(exc)), scope, receive, send, route)
            return
        except ClientGone:
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
                await self._respond(render(503, str(exc)), scope, receive, send, route)
            return
        except TimeoutError:
            if status:  # already answering: end the response, as an error if we can
                logger.warning("sync request passed %.0f s mid-response; ending it",
                               self.settings.sync_timeout_s)
                # An SSE error event, not a clean close: a client must not take a stream
                # cut short for a complete answer. (The model's own budget should have
                # ended it first; this is the last resort.)
                last = sse_error_event(504, self._timeout_message()) if streaming[0] else b""
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": last,
                                "more_body": False})
                return
            await self._respond(render(504, self._timeout_message()), scope, receive, send,
                                route)
            return
        REQUESTS.labels(route, str(status[0] if status else 0)).inc()

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

    async def _call_model(self, model_input: bytes) -> tuple[int, bytes]:
        """Run one async job through the truss predict route, in-process."""
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

    # -- async -----------------------------------------------------------------------------
    async def _async_predict(self, scope: dict, receive: Callable, environment: str
                             ) -> Response:
        limit = self.settings.max_async_input_bytes
        try:
            body = await read_body(scope, receive, limit)
            raw = body.read()
            body.close()
        except BodyTooLarge:
            return baseten_error(413, f"The async_predict body exceeds {limit:,} bytes "
                                      "(256 KiB). Put large inputs in object storage and "
                                      "send pre-signed URLs in model_input.")
        except ClientGone:
            return baseten_error(499, "client disconnected")
        try:
            request = AsyncPredictRequest.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            message, _ = describe_validation_error(exc)
            return baseten_error(400, message)
        if request.webhook_endpoint is not None:
            try:
                webhooks.check_endpoint(request.webhook_endpoint, self.worker.webhook_policy)
            except FetchError as exc:
                return baseten_error(400, f"webhook_endpoint: {exc.message}")
        if isinstance(request.model_input, dict) and request.model_input.get("stream"):
            return baseten_error(400, "Streaming is not available through async predict: "
                                      "set model_input.stream to false.")
        try:
            request_id = await asyncio.to_thread(self.queue.enqueue, request, environment)
        except QueueFullError as exc:
            return baseten_error(429, f"{exc}. Retry with backoff.")
        except PayloadTooLargeError as exc:
            return baseten_error(413, str(exc))
        except ValueError as exc:  # NaN or infinity in model_input
            return baseten_error(400, f"model_input is not valid JSON: {exc}")
        self.worker.notify()
        logger.debug("async request %s queued (priority %d)", request_id, request.priority)
        return JSONResponse({"request_id": request_id}, status_code=201)

    async def _async_request(self, request_id: str, method: str) -> Response:
        if method not in ("GET", "DELETE") or not request_id or "/" in request_id:
            return baseten_error(404, "Use GET or DELETE /async_request/{request_id}.")
        if method == "DELETE":
            record = await asyncio.to_thread(self.queue.get, request_id)
            if record is None:
                return baseten_error(404, f"No async request {request_id}.")
            if not await asyncio.to_thread(self.queue.cancel, request_id):
                return baseten_error(400, f"Async request {request_id} is {record.status} "
                                          "and can no longer be canceled.")
            return JSONResponse({"request_id": request_id, "canceled": True,
                                 "message": "Request canceled."})
        record = await asyncio.to_thread(self.queue.get, request_id)
        if record is None:
            return baseten_error(404, f"No async request {request_id}.")
        return JSONResponse(record.model_dump(mode="json"))

    async def _queue_status(self) -> Response:
        status = await asyncio.to_thread(self.queue.queue_status)
        return JSONResponse(status.model_dump(mode="json"))

    # -- helpers ---------------------------------------------------------------------------
    async def _models(self) -> Response:
        try:
            await self.lifecycle.wait_ready()
        except WakeTimeout as exc:
            return openai_error(503, str(exc))
        return JSONResponse(await self.lifecycle.model.models())

    async def _model_card(self, name: str, wake: bool = True) -> Response | None:
        """OpenAI's `GET /v1/models/{id}` for a served model, None for any other name.

        `wake=False` for the route truss's readiness probe shares: a probe must neither
        wait for the model nor count as activity that keeps it from scaling to zero.
        """
        if wake:
            response = await self._models()
            if response.status_code != 200:
                return response
            listing = json.loads(response.body)
        else:
            listing = await self.lifecycle.model.models()
        for card in listing["data"]:
            if card["id"] == name:
                return JSONResponse(card)
        return None

    def _authorized(self, scope: dict) -> bool:
        """Every route, truss's own included; `Bearer` is what the OpenAI SDK sends."""
        key = self.settings.api_key
        if key is None:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() not in ("api-key", "bearer"):
            return False
        return hmac.compare_digest(given.strip().encode(), key.encode())

    async def _respond(self, response: Response, scope: dict, receive: Callable,
                       send: Callable, route: str) -> None:
        REQUESTS.labels(route, str(response.status_code)).inc()
        await response(scope, receive, send)

    async def _lifespan(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Run the truss app's lifespan (it starts the model's load) and our workers."""
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            truss_lifespan = self.truss_app.router.lifespan_context(self.truss_app)
            await truss_lifespan.__aenter__()
            self._tasks = [asyncio.create_task(self.worker.run()),
                           asyncio.create_task(self.lifecycle.run_idle_watch()),
                           asyncio.create_task(self.lifecycle.run_engine_watch())]
        except Exception as exc:
            logger.exception("start-up failed")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await truss_lifespan.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})


def _export_queue_depth(queue: AsyncQueue) -> None:
    """Queue depth read at scrape time (one indexed COUNT), not on every claim."""
    for state, field in (("queued", "num_queued_requests"),
                         ("in_progress", "num_in_progress_requests")):
        name = f"baseten_surface_async_{state}_requests"
        if name in REGISTRY._names_to_collectors:
            REGISTRY.unregister(REGISTRY._names_to_collectors[name])
        gauge = Gauge(name, f"Async requests {state.replace('_', ' ')}.")
        gauge.set_function(lambda field=field: getattr(queue.queue_status(), field))
