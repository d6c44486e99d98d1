"""Baseten's endpoint surface, in front of the truss server on the same port.

An ASGI app that routes: Baseten's routes (predict, async_predict, async_request, queue
status, wake, the `.../sync/v1/...` OpenAI base path) are answered by the runner, and
everything else goes to the truss server's own app. The concerns have a module each:

    routes.py       the route table (a new OpenAI-style path is registered there)
    auth.py         the API key
    forward.py      calls into the truss app (sync routes, async jobs, truss's own routes)
    async_api.py    async_predict, async_request, async_queue_status
    model_cards.py  GET /v1/models and /v1/models/{id}
    lifecycle.py    scale to zero, wake, engine restart
    lifespan.py     start-up and shutdown of the truss app and the background tasks
    drain.py        graceful drain on SIGTERM
    respond.py      sending and counting the surface's own answers

Private attributes of other packages that the runner still uses, and why: truss's
`TrussServer._model` (truss_app.py; the ModelWrapper, which truss exposes no other way) and
`ModelWrapper._model` (lifecycle.py; our Model instance, for load/unload and its state), and
`TrussServer._server` (truss_app.py; truss's watchdog stops that server if load() fails).
No private Prometheus attribute is used: gauges are module-level, re-pointed with
`set_function`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse

from truss_llm.errors import baseten_error, error_renderer_for
from truss_llm.runner import routes
from truss_llm.runner.async_api import AsyncApi
from truss_llm.runner.auth import MISSING_KEY, WS_POLICY_VIOLATION, authorized
from truss_llm.runner.drain import Drain, is_new_work, refusal
from truss_llm.runner.forward import TrussCaller
from truss_llm.runner.lifecycle import ModelLifecycle
from truss_llm.runner.lifespan import Lifespan
from truss_llm.runner.model_cards import MODELS_PREFIX, TRUSS_MODEL_NAME, ModelCards, not_found
from truss_llm.runner.respond import respond
from truss_llm.runner.settings import RunnerSettings
from truss_llm.runner.worker import AsyncWorker, open_queue

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
ASYNC_WORKER = "async worker"
ASYNC_REQUEST_PREFIX = "/async_request/"
READINESS_PATH = MODELS_PREFIX + TRUSS_MODEL_NAME  # truss's readiness probe
ROUTES_HELP = ("Routes: POST .../predict, POST .../async_predict, GET .../async_queue_status, "
               "POST .../wake, POST .../sync/v1/chat/completions, "
               "GET/DELETE /async_request/{id}.")


class BasetenSurface:
    def __init__(self, truss_app: ASGIApp, model_wrapper: Any, settings: RunnerSettings) -> None:
        self.truss_app = truss_app
        self.settings = settings
        self.lifecycle = ModelLifecycle(model_wrapper, settings.scale_to_zero_idle_s,
                                        settings.wake_timeout_s)
        self.truss = TrussCaller(truss_app, self.lifecycle, settings)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.queue = open_queue(settings)
        self.worker = AsyncWorker(self.queue, settings, self.truss.call_model)
        self.async_api = AsyncApi(self.queue, self.worker, settings)
        self.cards = ModelCards(self.lifecycle)
        self.lifespan = Lifespan(truss_app, lambda: {
            ASYNC_WORKER: self.worker.run(), "idle watch": self.lifecycle.run_idle_watch(),
            "engine watch": self.lifecycle.run_engine_watch()})
        self.drain = Drain(self)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self._started_at = time.time()  # async requests claimed since are this runner's

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            await self.lifespan(scope, receive, send)
            return
        if scope["type"] == "websocket" and not authorized(scope, self.settings.api_key):
            # Closing before accepting makes the server answer the handshake with a 403.
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            await self.truss_app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if not authorized(scope, self.settings.api_key):
            await respond(error_renderer_for(path)(401, MISSING_KEY), scope, receive, send,
                          "auth")
            return
        if self.drain.started and is_new_work(path, method):
            await respond(refusal(path), scope, receive, send, "draining")
            return
        if path == READINESS_PATH and method == "GET" and (
                unready := self.async_api.readiness_refusal()) is not None:
            await respond(unready, scope, receive, send, "readiness")  # a broken queue store
            return
        if path == "/v1/models" and method == "GET":
            await respond(await self.cards.listing(), scope, receive, send, "models")
            return
        if path.startswith(MODELS_PREFIX) and method == "GET":
            card = await self.cards.retrieve_unless_probe(path[len(MODELS_PREFIX):])
            if card is not None:
                await respond(card, scope, receive, send, "models")
                return
        if path.startswith(ASYNC_REQUEST_PREFIX):
            request_id = path[len(ASYNC_REQUEST_PREFIX):]
            await respond(await self.async_api.request(request_id, method), scope, receive,
                          send, "async_request")
            return
        found = routes.match(path)
        if found is None:
            await self.truss.passthrough(scope, receive, send)  # truss's own routes
            return
        await self._dispatch(found, scope, receive, send)

    async def _dispatch(self, found: routes.Match, scope: dict, receive: Callable,
                        send: Callable) -> None:
        method, action = scope["method"], found.action
        if found.deployment is not None:
            try:
                routes.check_deployment(found.deployment, self.settings)
            except routes.UnknownDeployment as exc:
                await respond(error_renderer_for(action)(404, str(exc)), scope, receive, send,
                              "unknown")
                return
        environment = found.deployment.name if found.deployment else "production"
        if action.startswith(routes.SYNC_PREFIX + "/v1/"):
            await self._sync_openai(action[len(routes.SYNC_PREFIX):], scope, receive, send)
            return
        expected = routes.ACTIONS.get(action)
        if expected is None or expected != method:
            await respond(baseten_error(404 if expected is None else 405,
                                        f"No route {method} {scope['path']}. {ROUTES_HELP}"),
                          scope, receive, send, "unknown")
            return
        if action == "/predict":
            await self.truss.sync(scope, receive, send, routes.TRUSS_PREDICT, "predict",
                                  baseten_error)
        elif action == "/async_predict":
            await respond(await self.async_api.predict(scope, receive, environment),
                          scope, receive, send, "async_predict")
        elif action == "/async_queue_status":
            await respond(await self.async_api.queue_status(), scope, receive, send,
                          "async_queue_status")
        elif action == "/wake":
            await self.lifecycle.wake()
            await respond(JSONResponse({}, status_code=202), scope, receive, send, "wake")

    async def _sync_openai(self, openai_path: str, scope: dict, receive: Callable,
                           send: Callable) -> None:
        """`.../sync/v1/<path>`: model cards here, anything else to the truss app's
        `/v1/<path>`."""
        method = scope["method"]
        if openai_path == "/v1/models" and method == "GET":
            await respond(await self.cards.listing(), scope, receive, send, "models")
        elif openai_path.startswith(MODELS_PREFIX) and method == "GET":
            name = openai_path[len(MODELS_PREFIX):]
            card = await self.cards.card(name)
            await respond(card or not_found(name), scope, receive, send, "models")
        else:
            await self.truss.sync(scope, receive, send, openai_path, "openai",
                                  error_renderer_for(openai_path))

    async def stop_async_work(self) -> None:
        """Stop the async workers (a drain): their running requests are cancelled, and
        requeued by `requeue_interrupted` once the event loop has ended."""
        await self.lifespan.stop(ASYNC_WORKER)

    def requeue_interrupted(self) -> None:
        """After the server has stopped: requests that were running go back to the queue
        without an attempt or a crash counted (the stop was ours, not theirs)."""
        try:
            requeued = self.queue.requeue_interrupted(self._started_at)
        except Exception:  # a broken store: the next start recovers them as after a crash
            logger.exception("could not requeue the async requests that were running")
            return
        if requeued:
            logger.info("%d async requests that were running go back to the queue for the "
                        "next start (no attempt counted)", requeued)
