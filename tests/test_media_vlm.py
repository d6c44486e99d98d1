"""Images end to end on a real multimodal model, and what the media path refuses.

One server, module-scoped: `truss-llm serve` with the tiny BLIP-2 model in data/tiny-vlm
(tools/make_tiny_vlm.py; one image is 8 prompt tokens) and the DEFAULT fetch policy: no
loopback allowance, https to object-store hosts only. Its media limits are set small by
`TRUSS_LLM_MEDIA_*` so that the caps can be crossed with small bodies. A local HTTP server
counts every request that reaches it: no part shape, no address spelling, gets a byte out
of it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import BUCKET, REPO, Server, start_server, stop_server_soon
from PIL import Image
from truss_llm.media.parts import MediaResolver
from truss_llm.media.policy import FetchPolicy

VLM = REPO / "data" / "tiny-vlm"
VLM_NAME = "tiny-vlm"
IMAGE_TOKENS = 8  # BLIP-2's query tokens (tools/make_tiny_vlm.py)
KiB = 1024
MiB = 1024 * KiB
# One image fits a request; two of 0.9 MiB do not; one held request leaves no room for
# another (BLIP-2 takes one image a prompt).
LIMITS = {
    "TRUSS_LLM_MEDIA_MAX_IMAGE_BYTES": str(1 * MiB),
    "TRUSS_LLM_MEDIA_MAX_REQUEST_MEDIA_BYTES": str(3 * MiB // 2),
    "TRUSS_LLM_MEDIA_REPLICA_MEDIA_BUDGET_BYTES": str(3 * MiB // 2),
}
# The server's whole process tree may grow by no more than this while it refuses bodies
# holding several times its media budget (measured: well under 100 MiB).
RSS_GROWTH_BOUND = 300 * MiB


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40)
        ) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(approx_bytes: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (incompressible), about `approx_bytes` long."""
    side = int((approx_bytes / 3) ** 0.5) + 1
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat(*parts: Any, **extra: Any) -> dict[str, Any]:
    return {"model": VLM_NAME, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      *parts]}], **extra}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


class CountingOrigin:
    """An HTTP server on 127.0.0.1 that serves a PNG to anyone and counts every request."""

    def __init__(self) -> None:
        origin = self
        self.hits = 0
        self.body = png((20, 90, 220))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                self.wfile.write(origin.body)

            do_HEAD = do_GET

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[CountingOrigin]:
    server = CountingOrigin()
    yield server
    server.close()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("vlm") / "server.log"
    started = time.monotonic()
    server = start_server(log_path, extra_env={
        "TRUSS_LLM_ENGINE_MODEL_PATH": str(VLM), "TRUSS_LLM_ENGINE_SERVED_MODEL_NAME": VLM_NAME,
        # config.yaml's values (for the GPU model) apply to mounted weights: the tiny
        # model's context instead
        "TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "512",
        **LIMITS})  # and no TRUSS_LLM_MEDIA_* allowance: the default address policy
    print(f"\nVLM server ready in {time.monotonic() - started:.1f} s at {server.base_url}")
    yield server
    stop_server_soon(server)


@pytest.fixture(scope="module")
def http(vlm: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vlm.base_url, timeout=120) as session:
        yield session


def answer(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- the image path, end to end ------------------------------------------------------

def test_an_inline_image_reaches_the_engine(http: httpx.Client) -> None:
    text_only = answer(http, chat())["usage"]["prompt_tokens"]
    with_image = answer(http, chat(image_part(data_url(png()))))
    assert with_image["usage"]["prompt_tokens"] == text_only + IMAGE_TOKENS
    assert with_image["usage"]["prompt_tokens_details"]["multimodal_tokens"] == {
        "image": IMAGE_TOKENS}


def test_a_fetched_image_reaches_the_engine_as_the_same_image_inlined(
        http: httpx.Client, s3: Any) -> None:
    """A presigned S3 URL (moto on 127.0.0.1), fetched by our fetcher, becomes the same
    engine input as the same bytes inlined: same prompt tokens, same greedy answer.

    The server's policy is the default one, which (rightly) refuses 127.0.0.1; so the fetch
    runs in a MediaResolver here whose policy allows moto's address, and the server gets
    the body it produced. The SERVER's fetcher doing it: tests/test_media_vlm_fetched.py.
    """
    image = png((240, 200, 10), (64, 64))
    s3.put_object(Bucket=BUCKET, Key="cat.png", Body=image, ContentType="image/png")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "cat.png"},
                                    ExpiresIn=300)
    loopback = FetchPolicy(allow_http=True, extra_allowed_hosts=("127.0.0.1",),
                           allowed_networks=("127.0.0.1/32",))
    resolver = MediaResolver(loopback, VLM_NAME, max_model_len=512, longest_token_chars=16,
                             modalities=frozenset({"text", "image"}))
    fetched_body = asyncio.run(resolver.resolve(chat(image_part(url))))
    fetched = answer(http, fetched_body)
    inlined = answer(http, chat(image_part(data_url(image))))
    text_only = answer(http, chat())
    assert fetched["usage"]["prompt_tokens"] == inlined["usage"]["prompt_tokens"] == \
        text_only["usage"]["prompt_tokens"] + IMAGE_TOKENS
    assert fetched["choices"][0]["message"]["content"] == \
        inlined["choices"][0]["message"]["content"]


def test_every_inline_shape_vllm_reads_is_accepted(http: httpx.Client) -> None:
    inline = data_url(png())
    text_only = answer(http, chat())["usage"]["prompt_tokens"]
    for part in ({"image_url": inline}, {"image_url": {"url": inline}},
                 {"type": "input_image", "image_url": inline, "detail": "auto"},
                 {"type": "image_url", "image_url": {"url": inline}, "uuid": "img-1"}):
        usage = answer(http, chat(part))["usage"]
        assert usage["prompt_tokens"] == text_only + IMAGE_TOKENS, part


# -- nothing is fetched from where it must not be ---------------------------------------

def shapes(url: str) -> list[dict[str, Any]]:
    """Every content-part shape that carries a URL, as vLLM 0.32's chat parser reads them
    (typed, untyped, with a uuid, Responses-style) plus ours (file, input_audio by URL)."""
    return [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": url},
        {"type": "image_url", "image_url": {"url": url}, "uuid": "u-1"},
        {"type": "input_image", "image_url": url, "detail": "auto"},
        {"image_url": url},
        {"image_url": {"url": url}},
        {"type": "text", "text": "x", "uuid": "u-2", "image_url": url},
        {"type": "audio_url", "audio_url": {"url": url}},
        {"audio_url": url},
        {"type": "video_url", "video_url": {"url": url}},
        {"video_url": {"url": url}},
        {"type": "input_audio", "input_audio": {"data": url, "format": "wav"}},
        {"input_audio": {"data": url, "format": "wav"}},
        {"type": "file", "file": {"file_url": url, "filename": "notes.txt"}},
        {"type": "image_pil", "image_pil": url},
        {"image_pil": url},
    ]


def loopback_urls(port: int) -> list[str]:
    """The counting server, spelled every way a resolver or inet_aton would accept."""
    return [f"{scheme}://{host}:{port}/cat.png" for scheme in ("http", "https")
            for host in ("127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f000001",
                         "127.1", "[::ffff:127.0.0.1]")]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/production/predict"])
def test_no_part_shape_fetches_a_loopback_url(http: httpx.Client, origin: CountingOrigin,
                                              route: str) -> None:
    refused = 0
    for url in loopback_urls(origin.port):
        for part in shapes(url):
            response = http.post(route, json=chat(part))
            assert 400 <= response.status_code < 500, (part, response.text)
            assert "messages[0].content[1]" in response.text, (part, response.text)
            refused += 1
    assert refused == 7 * 2 * len(shapes("x"))
    assert origin.hits == 0, "a part's URL reached the loopback origin"


def test_refusals_name_the_part_and_the_reason(http: httpx.Client, origin: CountingOrigin
                                               ) -> None:
    url = f"https://127.0.0.1:{origin.port}/cat.png"
    response = http.post("/v1/chat/completions", json=chat({"image_url": url}))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert "refused" in error["message"] and "not in the allowed hosts" in error["message"]
    for part, expected in (
            ({"image_url": "file:///etc/passwd"}, "not scheme 'file'"),
            ({"type": "input_image", "image_url": "ftp://example.com/a.png", "detail": "auto"},
             "not scheme 'ftp'"),
            ({"image_pil": "anything"}, "image_pil parts"),
            ({"type": "video_url", "video_url": {"url": url}}, "does not take video"),
            ({"audio_url": url}, "does not take audio")):
        response = http.post("/v1/chat/completions", json=chat(part))
        assert response.status_code == 400, response.text
        assert expected in response.json()["error"]["message"], response.text
        assert response.json()["error"]["param"].startswith("messages[0].content[1]")
    assert origin.hits == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/cat.png",
                                 " http://127.0.0.1:{port}/cat.png",
                                 "https://localhost:{port}/cat.png"])
def test_responses_and_messages_image_urls_fetch_nothing_either(
        http: httpx.Client, origin: CountingOrigin, url: str) -> None:
    """The other APIs' image parts, including a URL with a leading space (not "remote" to a
    naive prefix check): refused by our policy, or, had a translation let it through to
    vLLM, by vLLM's media connector (ours), never fetched."""
    url = url.format(port=origin.port)
    responses = http.post("/v1/responses", json={
        "model": VLM_NAME, "max_output_tokens": 4, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": url, "detail": "auto"}]}]})
    messages = http.post("/v1/messages", json={
        "model": VLM_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "url", "url": url}}]}]})
    for response in (responses, messages):
        assert 400 <= response.status_code < 500, response.text
        assert ("could not fetch media (refused)" in response.text
                or "fetched only by this server's fetcher" in response.text), response.text
    assert origin.hits == 0


# -- memory: per part, per request, per replica -----------------------------------------

def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (process, *process.children(recursive=True)))


def test_an_image_over_its_cap_is_a_413(http: httpx.Client) -> None:
    big = noise_png(int(1.2 * MiB))
    response = http.post("/v1/chat/completions", json=chat(image_part(data_url(big))))
    assert response.status_code == 413, response.text
    assert "max_image_bytes" in response.json()["error"]["message"]


def test_parts_past_the_request_cap_are_a_413_and_memory_stays_bounded(
        vlm: Server, http: httpx.Client) -> None:
    parts = [image_part(data_url(noise_png(900 * KiB, seed))) for seed in range(2)]
    before = tree_rss(vlm.process.pid)
    for _ in range(5):
        response = http.post("/v1/chat/completions", json=chat(*parts))
        assert response.status_code == 413, response.text
        message = response.json()["error"]["message"]
        assert "max_request_media_bytes" in message and "messages[0].content[2]" in message
    growth = tree_rss(vlm.process.pid) - before
    print(f"\nserver tree RSS {before / MiB:.0f} MiB -> grew {growth / MiB:.1f} MiB")
    assert growth < RSS_GROWTH_BOUND, f"server tree grew by {growth / MiB:.0f} MiB"
    assert answer(http, chat(image_part(data_url(png())))), "the replica still serves"


def held_stream(base_url: str, body: bytes) -> socket.socket:
    """POST a streaming chat and read only its first bytes, with a tiny receive window: the
    server's stream then blocks on a full socket and its request stays in flight."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " +
                 str(len(body)).encode() + b"\r\n\r\n" + body)
    first = sock.recv(1024)
    if not first.startswith(b"HTTP/1.1 200"):
        sock.settimeout(5)
        first += sock.recv(4096)
        sock.close()
        raise AssertionError(first.decode(errors="replace"))
    return sock


def test_past_the_replica_budget_is_a_429_with_retry_after(vlm: Server, http: httpx.Client
                                                          ) -> None:
    # 0.9 MiB of image held by a stream that produces ~10 MB of SSE (16 choices, 20
    # logprobs a token, no early stop) to a client that reads none of it.
    held = chat(image_part(data_url(noise_png(900 * KiB, seed=7))), stream=True, n=16,
                max_tokens=480, ignore_eos=True, logprobs=True, top_logprobs=20,
                temperature=1.0, seed=1)  # n > 1 needs sampling
    over = chat(image_part(data_url(noise_png(900 * KiB, seed=9))))
    sock = held_stream(vlm.base_url, json.dumps(held).encode())
    try:
        response = http.post("/v1/chat/completions", json=over)
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert "replica_media_budget_bytes" in error["message"]
        # Baseten's route answers in its own shape, with the same status.
        response = http.post("/production/predict", json=over)
        assert response.status_code == 429, response.text
        assert "retry-after" in response.headers
    finally:
        sock.close()
    deadline = time.monotonic() + 60  # the stream's media are released when it is closed
    while True:
        response = http.post("/v1/chat/completions", json=over)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 200, response.text


def test_file_cap_path_is_the_config_path() -> None:
    """The limits are FetchPolicy fields, so model_metadata.media and TRUSS_LLM_MEDIA_* set
    them; a request cap above the replica budget is refused at start-up."""
    from truss_llm.media.parts import media_policy

    policy = media_policy({"model_metadata": {"media": {"max_image_bytes": 123}}},
                          {"TRUSS_LLM_MEDIA_MAX_AUDIO_BYTES": "456"})
    assert (policy.max_image_bytes, policy.max_audio_bytes) == (123, 456)
    with pytest.raises(ValueError, match="must not exceed"):
        media_policy({}, {"TRUSS_LLM_MEDIA_MAX_REQUEST_MEDIA_BYTES": str(2 * MiB),
                          "TRUSS_LLM_MEDIA_REPLICA_MEDIA_BUDGET_BYTES": str(MiB)})


def test_model_files_are_small_enough_to_commit() -> None:
    total = sum(path.stat().st_size for path in Path(VLM).iterdir())
    assert total < 5 * MiB
