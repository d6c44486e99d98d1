"""vLLM's own media loader, as our engine configures it, fetches nothing.

The connector is built the way vLLM's chat parser builds it for every request with media
(`MEDIA_CONNECTOR_REGISTRY.load(envs.VLLM_MEDIA_CONNECTOR, ...)` with the model config's
`allowed_media_domains` / `allowed_local_media_path`), from the engine arguments our
`engine_args` passes. A local HTTP server counts the requests that reach it: vLLM's stock
settings fetch from it (so the test can fail), ours never do.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from truss_llm.media import engine_guard


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


class CountingServer:
    """Answers every GET with a PNG and counts them."""

    def __init__(self) -> None:
        counter = self
        self.hits = 0
        body = png()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cat.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def vllm_connectors() -> Iterator[tuple]:
    """vLLM's registry and env module, with our guard configured as the engine does it."""
    saved = {name: os.environ.get(name) for name in
             ("VLLM_MEDIA_CONNECTOR", "VLLM_MEDIA_URL_ALLOW_REDIRECTS", "VLLM_MEDIA_CACHE")}
    engine_guard.configure_environment()
    import vllm.envs as envs
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    engine_guard.install()
    yield MEDIA_CONNECTOR_REGISTRY, envs
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_vllm_stock_connector_would_fetch(vllm_connectors: tuple, origin: CountingServer
                                          ) -> None:
    """The hole being closed: vLLM's defaults download whatever URL a part names."""
    registry, _ = vllm_connectors
    stock = registry.load("http", allowed_media_domains=None, allowed_local_media_path="")
    before = origin.hits
    image = asyncio.run(stock.fetch_image_async(origin.url))
    assert image.size == (8, 8)
    assert origin.hits == before + 1


def test_our_connector_refuses_every_url_but_data(vllm_connectors: tuple,
                                                  origin: CountingServer, tmp_path) -> None:
    registry, envs = vllm_connectors
    assert envs.VLLM_MEDIA_CONNECTOR == engine_guard.CONNECTOR_NAME
    connector = registry.load(envs.VLLM_MEDIA_CONNECTOR, **engine_guard.ENGINE_MEDIA_ARGS)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    before = origin.hits
    for url in (origin.url, origin.url.replace("http:", "https:"), f"file://{secret}",
                "ftp://127.0.0.1/cat.png"):
        with pytest.raises(ValueError, match="fetched only by this server's fetcher"):
            asyncio.run(connector.fetch_image_async(url))
        with pytest.raises(ValueError, match="fetched only by this server's fetcher"):
            connector.fetch_image(url)
    assert origin.hits == before, "vLLM fetched a URL by itself"
    inline = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert asyncio.run(connector.fetch_image_async(inline)).size == (8, 8)


def test_engine_arguments_leave_vllm_no_host(vllm_connectors: tuple, origin: CountingServer
                                             ) -> None:
    """Even vLLM's stock connector, given our engine arguments, reaches no host."""
    registry, _ = vllm_connectors
    stock = registry.load("http", **engine_guard.ENGINE_MEDIA_ARGS)
    before = origin.hits
    with pytest.raises(ValueError, match="allowed domains"):
        asyncio.run(stock.fetch_image_async(origin.url))
    assert origin.hits == before


def test_engine_args_carry_the_guard() -> None:
    from truss_llm.engine import engine_args
    from truss_llm.settings import EngineSettings

    args = engine_args(EngineSettings(model_path="/nonexistent", served_model_name="m"))
    assert args.allowed_media_domains == [engine_guard.NO_MEDIA_DOMAIN]
    assert not args.allowed_local_media_path
