"""Graceful drain on SIGTERM: finish the work in flight, take no new work, lose nothing.

What a rolling deploy or a scale-down sends a replica is SIGTERM, then SIGKILL after a grace
period. On the first SIGTERM the runner:

1. answers new work with a 503 and `Retry-After` (readiness too, so a balancer stops sending
   any), while status reads, queue status, metrics and liveness still answer;
2. stops its async workers: their running requests are cancelled (the engine aborts them)
   and, once the event loop has ended, put back in the queue as if never started
   (`AsyncQueue.requeue_interrupted`: no attempt and no crash counted against them), for the
   next start on the same state directory;
3. lets the sync requests in flight (streams included) finish, for up to `drain_grace_s`;
4. then shuts down as uvicorn does (whatever still runs gets its 5 s more) and exits 0.

A second SIGTERM, or Ctrl-C, stops at once as before (Ctrl-C also requeues without counting).

The hook is uvicorn's `Server.handle_exit`, a public method that its signal handling calls.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from starlette.responses import Response

from truss_llm.errors import engine_unavailable
from truss_llm.runner import routes
from truss_llm.runner.model_cards import MODELS_PREFIX, TRUSS_MODEL_NAME
from truss_llm.runner.respond import renderer_for

if TYPE_CHECKING:
    from truss_llm.runner.surface import BasetenSurface

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.1
READINESS = MODELS_PREFIX + TRUSS_MODEL_NAME
# Baseten routes that do no work and still answer while draining.
_STILL_ANSWERED = frozenset({"/async_queue_status"})


def is_new_work(path: str, method: str) -> bool:
    """Whether a draining runner refuses this request: anything that would run the model or
    queue work, and readiness."""
    if path == READINESS or routes.reaches_model(path, method):
        return True
    found = routes.match(path)
    if found is None:
        return False
    model_cards = found.action.startswith(routes.SYNC_PREFIX + "/v1/models") and method == "GET"
    return not model_cards and found.action not in _STILL_ANSWERED


def refusal(path: str) -> Response:
    """The 503 for new work while draining, in the route's error shape."""
    error = engine_unavailable("this replica is shutting down")
    return renderer_for(path)(error.status, error.message, headers=error.headers)


class Drain:
    """The drain itself, on the event loop: `started` gates new work in the surface."""

    def __init__(self, surface: BasetenSurface) -> None:
        self._surface = surface
        self.started = False

    async def run(self) -> None:
        surface = self._surface
        grace = surface.settings.drain_grace_s
        self.started = True
        logger.warning("SIGTERM: draining (new work gets 503; requests in flight get up to "
                       "%.0f s; running async requests go back to the queue)", grace)
        await surface.stop_async_work()
        deadline = time.monotonic() + grace
        while surface.lifecycle.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = surface.lifecycle.in_flight
        if left:
            logger.warning("drain: %d requests still running after %.0f s; shutting down "
                           "anyway", left, grace)
        else:
            logger.info("drain: no request in flight; shutting down")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, where the first SIGTERM drains the runner before the usual
    shutdown, and the async requests it interrupted are requeued after the loop ends."""

    def __init__(self, config: uvicorn.Config, surface: BasetenSurface) -> None:
        super().__init__(config)
        self._surface = surface
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._surface.loop
        if sig != signal.SIGTERM or self._draining or loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # In a signal handler: hand the drain to the event loop. Not recorded as a captured
        # signal, so uvicorn does not raise it again at the end: the exit status is 0.
        self._draining = True
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._surface.drain.run()
        finally:
            self.should_exit = True

    def run(self, sockets: list | None = None) -> None:
        try:
            super().run(sockets)
        finally:
            # The loop has ended and with it every worker thread (asyncio.run waits for the
            # default executor), so no claim can race this.
            self._surface.requeue_interrupted()
