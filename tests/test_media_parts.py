"""MediaResolver on its own, against a small document server on 127.0.0.1 (no model).

The parts of one request are fetched side by side under one deadline, and the first failure
ends the request without waiting for the other fetches.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from truss_llm.errors import RequestError
from truss_llm.media import parts
from truss_llm.media.parts import DOCUMENT_TEMPLATE, MediaResolver
from truss_llm.media.policy import FetchPolicy

SLOW_S = 0.6


class DocumentHandler(BaseHTTPRequestHandler):
    """/slow/<seconds>/<name>: a text after a pause; anything else: 404."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        segments = self.path.strip("/").split("/")
        if segments[0] != "slow":
            self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
            return
        time.sleep(float(segments[1]))
        try:
            self.answer(200, f"contents of {segments[2]}".encode())
        except OSError:  # the client gave up first, as it should have
            self.close_connection = True

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DocumentHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def resolver(**policy: Any) -> MediaResolver:
    loopback = FetchPolicy(allow_http=True, extra_allowed_hosts=("127.0.0.1",),
                           allowed_networks=("127.0.0.1/32",), backoff_initial_s=0.01,
                           **policy)
    return MediaResolver(loopback, "tiny-chat", max_model_len=512, longest_token_chars=16,
                         modalities=frozenset({"text"}))


def documents(*urls: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_url": url, "filename": f"doc{i}.txt"}}
        for i, url in enumerate(urls)]}]}


def test_parts_are_fetched_side_by_side(base_url: str) -> None:
    urls = [f"{base_url}/slow/{SLOW_S}/{name}" for name in ("a", "b", "c")]
    started = time.monotonic()
    body = asyncio.run(resolver().resolve(documents(*urls)))
    elapsed = time.monotonic() - started
    assert [part["text"] for part in body["messages"][0]["content"]] == [
        DOCUMENT_TEMPLATE.format(name=f"doc{i}.txt", text=f"contents of {name}")
        for i, name in enumerate("abc")]
    assert elapsed < 2 * SLOW_S, f"{elapsed:.2f} s: fetched one after another"


def test_one_deadline_covers_every_part(base_url: str, monkeypatch: pytest.MonkeyPatch,
                                        ) -> None:
    monkeypatch.setattr(parts, "PARALLEL_FETCHES", 1)  # one at a time: the budget runs out
    urls = [f"{base_url}/slow/0.3/{name}" for name in ("a", "b", "c")]
    started = time.monotonic()
    with pytest.raises(RequestError) as timed_out:
        asyncio.run(resolver(total_timeout_s=0.5).resolve(documents(*urls)))
    assert timed_out.value.status == 504
    assert time.monotonic() - started < 1.5


def test_the_first_failure_ends_the_request(base_url: str) -> None:
    urls = [f"{base_url}/slow/10/late", f"{base_url}/missing"]
    started = time.monotonic()
    with pytest.raises(RequestError) as failed:
        asyncio.run(resolver().resolve(documents(*urls)))
    assert failed.value.status == 422
    assert "messages[0].content[1]" in str(failed.value)
    assert time.monotonic() - started < 5


# -- memory: what a request and the replica may hold --------------------------------------

def inline_image(size: int) -> dict[str, Any]:
    data = base64.b64encode(b"\0" * size).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def images(*sizes: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [inline_image(s) for s in sizes]}]}


def media_resolver(**limits: int) -> MediaResolver:
    return MediaResolver(FetchPolicy(**limits), "tiny-vlm", max_model_len=512,
                         longest_token_chars=16, modalities=frozenset({"text", "image"}))


def test_a_lease_holds_the_replica_budget_until_released() -> None:
    media = media_resolver(max_image_bytes=1000, max_request_media_bytes=1500,
                           replica_media_budget_bytes=2000)
    first = media.lease()
    asyncio.run(media.resolve(images(900, 600), lease=first))
    assert media.budget.in_use == 1500
    with pytest.raises(RequestError) as busy:
        asyncio.run(media.resolve(images(600)))
    assert busy.value.status == 429 and busy.value.retry_after_s >= 1
    assert "replica_media_budget_bytes" in busy.value.message
    assert media.budget.in_use == 1500  # the refused request took nothing
    first.release()
    assert media.budget.in_use == 0
    asyncio.run(media.resolve(images(600)))  # counted while resolving only
    assert media.budget.in_use == 0


def test_a_stream_releases_its_media_when_it_ends() -> None:
    media = media_resolver()

    async def tokens():
        yield "a"
        yield "b"

    async def run() -> None:
        lease = media.lease()
        await media.resolve(images(100), lease=lease)
        stream = lease.hold(tokens())
        assert media.budget.in_use == 100
        assert [chunk async for chunk in stream] == ["a", "b"]
        assert media.budget.in_use == 0

    asyncio.run(run())


def test_caps_per_part_and_per_request_are_413s() -> None:
    media = media_resolver(max_image_bytes=1000, max_request_media_bytes=1500,
                           replica_media_budget_bytes=2000)
    with pytest.raises(RequestError) as too_big:
        asyncio.run(media.resolve(images(1200)))
    assert too_big.value.status == 413 and "max_image_bytes" in too_big.value.message
    with pytest.raises(RequestError) as too_many:
        asyncio.run(media.resolve(images(800, 800)))
    assert too_many.value.status == 413
    assert "max_request_media_bytes" in too_many.value.message
    assert media.budget.in_use == 0


def test_resolve_parts_serves_other_apis() -> None:
    """Responses / Anthropic routes translate their parts to chat parts and resolve a list."""
    media = media_resolver()
    parts = [{"type": "text", "text": "hi"}, inline_image(10)]
    assert asyncio.run(media.resolve_parts(parts, "input[0].content")) == parts
    with pytest.raises(RequestError) as refused:
        asyncio.run(media.resolve_parts([{"image_url": "file:///etc/passwd"}],
                                        "input[0].content"))
    assert refused.value.param == "input[0].content[0].image_url"


def test_the_serving_layers_lease_holds_what_any_handler_resolves() -> None:
    """OpenAISurface sets CURRENT_LEASE around every API's handler (chat, Responses,
    Messages): a resolve() without a lease of its own counts into it and is held."""
    media = media_resolver()

    async def run() -> None:
        lease = media.lease()
        token = parts.CURRENT_LEASE.set(lease)
        try:
            await media.resolve(images(300))
            await media.resolve_parts([inline_image(200)], "input[0].content")
        finally:
            parts.CURRENT_LEASE.reset(token)
        assert media.budget.in_use == lease.held == 500
        lease.release()
        assert media.budget.in_use == 0

    asyncio.run(run())
