"""Run the real truss inference server from the installed `truss` package, without Docker.

The server is FastAPI code that truss ships as templates and normally copies into an image
(`/app`, with bundled packages at `/packages`). Here we put the same modules on the import
path, give them the truss directory as their working directory, and run the very app
`TrussServer.create_application()` builds, on uvicorn bound to 127.0.0.1 (the template binds
every interface, hard-coded, which a local runner must not do).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn

from truss_llm.runner.settings import RunnerSettings

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# Ctrl-C should not wait for streams the way a rolling deploy does (truss uses 3600 s).
GRACEFUL_SHUTDOWN_S = 5
# The HTTP stack `vllm serve` runs: httptools' C parser on uvloop's C event loop. Truss's
# own main.py ends up on h11 and a plain asyncio loop (it calls asyncio.run itself, so its
# `loop="uvloop"` never applies), which costs a streaming server a share of one core per
# SSE chunk; see the Benchmarks section of the README for the measured difference. Both
# come with vLLM (fastapi[standard] -> uvicorn[standard]); without them, the pure-Python
# pair below.
# A deployment (or a benchmark measuring the difference) can choose with these variables.
FAST_HTTP, FAST_LOOP = "httptools", "uvloop"
FALLBACK_HTTP, FALLBACK_LOOP = "h11", "asyncio"
HTTP_ENV, LOOP_ENV = "TRUSS_LLM_UVICORN_HTTP", "TRUSS_LLM_UVICORN_LOOP"


def http_stack() -> tuple[str, str]:
    """uvicorn's (http, loop) implementations: the fast pair where installed."""
    http = FAST_HTTP if importlib.util.find_spec(FAST_HTTP) else FALLBACK_HTTP
    loop = FAST_LOOP if importlib.util.find_spec(FAST_LOOP) else FALLBACK_LOOP
    return os.environ.get(HTTP_ENV, http), os.environ.get(LOOP_ENV, loop)


def load_truss_config(truss_dir: Path) -> dict[str, Any]:
    """config.yaml with truss's own defaults filled in, validated by truss's loader."""
    from truss.base.truss_config import TrussConfig

    return TrussConfig.from_yaml(truss_dir / "config.yaml").to_dict(verbose=True)


def _put_server_on_path() -> None:
    import truss

    templates = Path(truss.__file__).parent / "templates"
    server_dir = str(templates / "server")
    if server_dir not in sys.path:
        sys.path.append(server_dir)
    # In an image the shared helpers live at /app/_truss_shared; alias the same package.
    sys.modules.setdefault("_truss_shared", importlib.import_module("truss.templates.shared"))


def _exit_on_sigterm() -> None:
    # uvicorn re-raises the signal after its graceful shutdown; turning it into SystemExit
    # lets atexit hooks run, among them the engine shutdown that stops vLLM's EngineCore.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def build_server(truss_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log_level: str = "INFO", runner: RunnerSettings | None = None
                 ) -> uvicorn.Server:
    """The truss server for `truss_dir`, ready for `server.run()`; with `runner` settings,
    fronted by Baseten's endpoint surface on the same port."""
    truss_dir = truss_dir.resolve()
    config = load_truss_config(truss_dir)
    # Without Docker nothing applies config.yaml's environment; the shell's values win.
    for name, value in (config.get("environment_variables") or {}).items():
        os.environ.setdefault(name, str(value))
    packages = truss_dir / config.get("bundled_packages_dir", "packages")
    if packages.is_dir() and str(packages) not in sys.path:
        sys.path.insert(0, str(packages))
    os.chdir(truss_dir)  # the server resolves model/ and data/ relative to it
    _put_server_on_path()

    from _truss_shared import log_config
    from truss_server import TrussServer

    truss_server = TrussServer(port, config)
    app = truss_server.create_application()
    if runner is not None:
        from truss_llm.runner.surface import BasetenSurface

        # `_model` is truss's ModelWrapper: private, but there is no other way to it.
        app = BasetenSurface(app, truss_server._model, runner)
    http, loop = http_stack()
    logger.info("HTTP server: uvicorn with %s on %s", http, loop)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        loop=loop,
        workers=1,
        log_config=log_config.make_log_config(log_level),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    if runner is not None:
        from truss_llm.runner.drain import DrainingServer

        server = DrainingServer(uv_config, app)  # SIGTERM drains the runner first
    else:
        server = uvicorn.Server(uv_config)
    # TrussServer's watchdog stops this server if load() fails (`_server` is private, and
    # what truss's own main sets).
    truss_server._server = server
    _exit_on_sigterm()
    return server
