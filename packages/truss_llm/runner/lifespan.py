"""The ASGI lifespan: start the truss app's own (it starts the model's first load), then the
runner's background tasks; on shutdown, stop them in reverse.

Uses Starlette's public `router.lifespan_context`; the truss app is a FastAPI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Lifespan:
    def __init__(self, truss_app: Any,
                 background: Callable[[], dict[str, Coroutine[Any, Any, None]]]) -> None:
        self._truss_app = truss_app
        self._background = background
        self.tasks: dict[str, asyncio.Task] = {}  # by name, for a task stopped early

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            truss_lifespan = self._truss_app.router.lifespan_context(self._truss_app)
            await truss_lifespan.__aenter__()
            self.tasks = {name: asyncio.create_task(work, name=name)
                          for name, work in self._background().items()}
        except Exception as exc:
            logger.exception("start-up failed")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        for name in reversed(self.tasks):
            await self.stop(name)
        await truss_lifespan.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})

    async def stop(self, name: str) -> None:
        """Cancel one background task and wait for it to end."""
        task = self.tasks.get(name)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
