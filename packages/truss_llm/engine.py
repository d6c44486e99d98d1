"""The vLLM engine's lifecycle: start, first-use set-up, health, shutdown.

`start()` runs in truss's load thread, which has no event loop: creating `AsyncLLM` there is
fine (it attaches to the server's loop on first use), but its async work must not run there
(`asyncio.run` would leave its tasks tied to a dead loop). So everything async, including a
one-token warm-up generation that proves the engine can generate, happens once on the
server's loop, under a lock, the first time readiness is probed or a request arrives.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from truss_llm import lora
from truss_llm.media import engine_guard
from truss_llm.settings import EngineSettings

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 10.0
# Default admission bound: as many requests waiting as the engine runs at once, so that a
# full batch is always queued behind the running one and no request waits longer than
# about one generation for its first token.
QUEUE_DEPTH_FACTOR = 2
DEATH_CHECK_S = 0.5  # how often the watchdog looks at the engine
EXIT_DELAY_S = 1.0
EXIT_ON_DEATH_ENV = "TRUSS_LLM_EXIT_ON_ENGINE_DEATH"


def configure_vllm_environment(settings: EngineSettings) -> None:
    """Environment vLLM reads at import time; must run before the first `import vllm`."""
    os.environ["VLLM_ENFORCE_STRICT_TOOL_CALLING"] = (
        "1" if settings.enforce_strict_tool_calling else "0")
    if settings.is_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine_guard.configure_environment()  # vLLM fetches no media itself


def engine_args(settings: EngineSettings):  # -> AsyncEngineArgs, imported lazily
    from vllm.engine.arg_utils import AsyncEngineArgs

    # Everything else is an engine argument exactly as `vllm serve` takes it (see settings);
    # the adapters' needs come first so that an explicit value wins.
    return AsyncEngineArgs(
        model=settings.model_path,
        served_model_name=[settings.served_model_name],
        **{**lora.engine_defaults(settings.lora_adapters), **settings.engine_args,
           **engine_guard.ENGINE_MEDIA_ARGS},  # no host and no directory to load media from
    )


class Engine:
    """One in-process `AsyncLLM` and the serving state built on it."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._client: AsyncLLM | None = None
        self._ready = False
        self._setup_lock: asyncio.Lock | None = None
        self._on_ready: list[Callable[[AsyncLLM], Awaitable[None]]] = []
        self._on_death: list[Callable[[], None]] = []
        self._watchdog: asyncio.Task | None = None

    @property
    def client(self) -> AsyncLLM:
        if self._client is None:
            raise RuntimeError("engine not started")
        return self._client

    def start(self) -> None:
        """Build the engine (blocking; seconds on a CPU, minutes for big GPU weights)."""
        configure_vllm_environment(self.settings)
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_guard.install()
        started = time.perf_counter()
        self._client = AsyncLLM.from_engine_args(
            engine_args(self.settings), usage_context=UsageContext.OPENAI_API_SERVER)
        scheduler = self._client.vllm_config.scheduler_config
        if scheduler.max_num_queued_reqs is None:
            # max_num_seqs is known only now (vLLM picks it by device); the bound is read
            # at every admission, so setting it here takes effect for every request.
            scheduler.max_num_queued_reqs = QUEUE_DEPTH_FACTOR * scheduler.max_num_seqs
        logger.info("admission: at most %d requests running or waiting (%d running)",
                    scheduler.max_num_queued_reqs, scheduler.max_num_seqs)
        # The truss server has no shutdown hook: without this the EngineCore outlives us.
        atexit.register(self.shutdown)
        logger.info("vLLM engine for %s built in %.1f s", self.settings.served_model_name,
                    time.perf_counter() - started)

    def on_ready(self, setup: Callable[[AsyncLLM], Awaitable[None]]) -> None:
        """Register an async callable run once on the server loop before the first request."""
        self._on_ready.append(setup)

    def on_death(self, callback: Callable[[], None]) -> None:
        """Register a callable run once, on the server loop, if the engine dies."""
        self._on_death.append(callback)

    async def _watch(self) -> None:
        """vLLM reports a dead EngineCore only to the requests it fails; an idle replica
        would never notice. So look, and tell whoever restarts it."""
        while self._client is not None:
            if self._client.errored:
                logger.critical("the vLLM engine died")
                for callback in self._on_death:
                    callback()
                return
            await asyncio.sleep(DEATH_CHECK_S)

    async def ensure_ready(self) -> None:
        """Finish set-up on the server's loop (idempotent) and prove one token generates."""
        if self._ready:
            return
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._ready:
                return
            started = time.perf_counter()
            for setup in self._on_ready:
                await setup(self.client)
            await self._generate_one_token()
            self._ready = True
            self._watchdog = asyncio.create_task(self._watch())
            freeze_startup_heap()
            _cache_vllm_environment(True)
            logger.info("engine ready to serve (first-use set-up %.1f s)",
                        time.perf_counter() - started)

    async def _generate_one_token(self) -> None:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        async for _ in self.client.generate("warm-up", params, f"warmup-{uuid.uuid4().hex}"):
            pass

    @property
    def alive(self) -> bool:
        return self._client is not None and not self._client.errored

    async def is_healthy(self) -> bool:
        """Ready once the engine has generated; false for good once it has died."""
        if not self.alive:
            return False
        try:
            await self.ensure_ready()
            await self.client.check_health()
        except Exception:
            logger.exception("engine health check failed")
            return False
        return True

    def unfinished_requests(self) -> int:
        return 0 if self._client is None else self._client.get_num_unfinished_requests()

    def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._client is not None:
            client, self._client = self._client, None
            logger.info("shutting down the vLLM engine")
            client.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            # The engine's objects were frozen with the rest of the start-up heap: back to
            # the collector, or the cycles among them would outlive it (a restart or a
            # scale to zero builds a new one, and freezes again).
            gc.unfreeze()
            _cache_vllm_environment(False)  # a new engine reads the environment afresh


def _cache_vllm_environment(enabled: bool) -> None:
    """vLLM reads each `VLLM_*` setting from `os.environ` at every use, several times per
    streamed token (about 5% of the serving thread at 64 streams). Its engine process caches
    them once initialised (`enable_envs_cache`); so do we, in ours, once the engine is up:
    nothing sets them after that, until a restart builds a new engine."""
    from vllm import envs

    if enabled:
        envs.enable_envs_cache()
        logger.info("vLLM's environment settings cached until the engine stops")
    else:
        envs.disable_envs_cache()


def freeze_startup_heap() -> None:
    """Move everything alive now (torch, vLLM, truss, the engine: millions of objects) out
    of the collector's reach, as `vllm serve` does once it is up. Otherwise every
    oldest-generation collection walks that whole heap, a pause of hundreds of
    milliseconds on a loop that streams every response of the replica."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("froze the start-up heap: %d objects, %.2f s", gc.get_freeze_count(),
                time.perf_counter() - started)


def exit_on_engine_death() -> bool:
    """True in a deployment; the local runner sets EXIT_ON_DEATH_ENV=0 and restarts the
    engine itself."""
    return os.environ.get(EXIT_ON_DEATH_ENV, "1").lower() not in ("0", "false", "no")


def schedule_exit(delay_s: float = EXIT_DELAY_S) -> None:
    """SIGTERM ourselves after `delay_s` (time for the 503s in flight to leave): uvicorn
    shuts down and re-raises the signal, so the process ends with a non-zero status."""
    loop = asyncio.get_running_loop()
    loop.call_later(delay_s, os.kill, os.getpid(), signal.SIGTERM)
