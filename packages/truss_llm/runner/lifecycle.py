"""Scale to zero and wake: unload the model after an idle period, load it again on demand.

Requests that arrive while the model is unloaded (or still loading) wait for it, bounded by
the wake timeout, instead of failing. The truss server's readiness route keeps telling the
truth meanwhile, since the model reports itself unhealthy while it is unloaded.

Reads truss's `ModelWrapper._model` (private: the wrapper exposes our Model instance no
other way) for `load`, `unload`, `loaded` and `engine_dead`; `ready` and `load_failed` are
the wrapper's public properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import Counter

logger = logging.getLogger(__name__)

ENGINE_RESTARTS = Counter("truss_llm_engine_restarts_total",
                          "Engines the local runner restarted after they died.")

IDLE_CHECK_S = 1.0
READY_POLL_S = 0.2
ENGINE_CHECK_S = 0.5


class WakeTimeout(Exception):
    pass


class ModelLifecycle:
    """Tracks activity on the model held by truss's ModelWrapper and loads/unloads it."""

    def __init__(self, wrapper: Any, idle_s: float | None, wake_timeout_s: float) -> None:
        self._wrapper = wrapper
        self._idle_s = idle_s
        self._wake_timeout_s = wake_timeout_s
        self._in_flight = 0
        self._last_active = time.monotonic()
        self._reload: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def model(self) -> Any | None:
        """Our `Model` instance, once truss has finished its first load()."""
        return self._wrapper._model if self._wrapper.ready else None

    @property
    def loaded(self) -> bool:
        model = self.model
        return model is not None and getattr(model, "loaded", True)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wake(self) -> None:
        """Start loading if unloaded; returns at once (the `/wake` route)."""
        async with self._lock:
            model = self.model
            if model is None or self.loaded:
                return  # truss is still running the first load(); nothing to start
            if self._reload is None or self._reload.done():
                logger.info("waking the model")
                self._last_active = time.monotonic()
                self._reload = asyncio.create_task(asyncio.to_thread(model.load))

    async def wait_ready(self, *, activity: bool = True) -> None:
        """Wake if needed and wait until the engine can serve, bounded by the wake timeout.

        `activity=False` for a caller that must not keep the model awake by asking.
        """
        if activity:
            self._last_active = time.monotonic()
        # The fast path only while no unload or restart runs (they hold the lock, and
        # `loaded` may still be true until they end): a request that arrives meanwhile
        # waits for the model to come back instead of reaching one being stopped.
        if self.loaded and not self._lock.locked():
            return
        await self.wake()
        deadline = time.monotonic() + self._wake_timeout_s
        while not (self.loaded and await self.model.is_healthy()):
            if self._wrapper.load_failed or (self._reload and self._reload.done()
                                             and self._reload.exception()):
                raise WakeTimeout("The model failed to load; see the server log.")
            if time.monotonic() > deadline:
                raise WakeTimeout(f"The model did not become ready within "
                                  f"{self._wake_timeout_s:.0f} s.")
            await asyncio.sleep(READY_POLL_S)

    @contextlib.asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """Mark a request in flight (the idle clock stops while any is)."""
        self._in_flight += 1
        try:
            await self.wait_ready()
            yield
        finally:
            self._in_flight -= 1
            self._last_active = time.monotonic()

    async def run_engine_watch(self) -> None:
        """Restart a model whose engine died, as the platform would restart the replica:
        unload what is left of it, then load it again (requests meanwhile wait for the
        reload, as they do for a wake; the async queue is untouched)."""
        while True:
            await asyncio.sleep(ENGINE_CHECK_S)
            model = self.model
            if model is None or not getattr(model, "engine_dead", False):
                continue
            async with self._lock:
                if not getattr(model, "engine_dead", False):
                    continue
                logger.error("the engine died: restarting it")
                ENGINE_RESTARTS.inc()
                await asyncio.to_thread(model.unload)
                self._last_active = time.monotonic()
                self._reload = asyncio.create_task(asyncio.to_thread(model.load))

    async def run_idle_watch(self) -> None:
        """Unload the model once it has been idle for `idle_s` (scale to zero)."""
        if self._idle_s is None:
            return
        was_loaded = False
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            if self.loaded and not was_loaded:
                self._last_active = time.monotonic()  # idle time counts from a (re)load
            was_loaded = self.loaded
            idle_for = time.monotonic() - self._last_active
            reloading = self._reload is not None and not self._reload.done()
            if self._in_flight == 0 and idle_for >= self._idle_s and self.loaded \
                    and not reloading:
                async with self._lock:
                    if self._in_flight == 0 and self.loaded:
                        logger.info("idle for %.0f s: scaling to zero", idle_for)
                        await asyncio.to_thread(self.model.unload)
