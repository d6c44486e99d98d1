"""The media fetcher against a local adversarial HTTP server.

Network safety: the server binds 127.0.0.1 only, and every URL here names a loopback
address or a reserved `.test` hostname answered by an injected resolver. Private,
link-local, metadata and CGNAT addresses appear only as `check_address` arguments and
injected resolver answers, with an injected network backend proving nothing was dialled.
These tests need no LLM server and run in a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gzip
import hashlib
import ipaddress
import logging
import socket
import ssl
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpcore
import pydantic
import pytest
from truss_llm.media import fetch as fetch_module
from truss_llm.media.fetch import (
    FetchedFile,
    FetchError,
    FetchPolicy,
    check_address,
    fetch_to_file,
    redact_url,
)
from truss_llm.media.policy import check_url, embedded_ipv4, parse_ip_literal
from truss_llm.media.socket_backend import SocketBackend, SocketStream

KiB = 1024
MiB = 1024 * KiB
BODY = bytes(range(256)) * 40  # 10 KiB, every byte value
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
MAX_BYTES = 1 * MiB
SERVER_STREAM_CAP = 16 * MiB  # an "endless" body ends here, should the client misbehave
STREAM_CHUNK = 16 * KiB
DRIP_PAUSE_S = 1.5  # silence in the middle of /drip, longer than the tests' read timeout
TRICKLE_INTERVAL_S = 0.05  # /trickle: one byte this often, never silent long enough
TRICKLE_MAX_S = 3.0
LIE_EXTRA = 4 * MiB  # /lying says 100 bytes and sends this much more
SECRET = "SECRETSIGNATURE0123"
SPELLINGS_OF_LOOPBACK = ["127.0.0.1", "localhost", "LOCALHOST.", "127.1", "2130706433",
                         "0x7f000001", "017700000001", "0x7f.1", "127.0.0.1.",
                         "[::ffff:127.0.0.1]", "[::1]", "[::127.0.0.1]"]


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


# --- the adversarial server ---------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: AdversarialServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.query = f"?{parts.query}" if parts.query else ""
        path = unquote(parts.path)
        self.segments = path.strip("/").split("/")
        self.hit = self.server.record(path, self.headers.get("Host", ""))
        route = getattr(self, "route_" + self.segments[0].replace("-", "_"), None)
        try:
            if route is None:
                self.send_body(404, b"no such route")
            else:
                route()
        except OSError:  # the client hung up, as it should on a refused body
            self.close_connection = True

    # helpers
    def send_body(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_body(status, b"", {"Location": location})

    def token(self) -> str:
        return self.segments[-1]

    # plain files and checksums
    def route_file(self) -> None:
        self.send_body(200, BODY, {"Content-Type": "application/octet-stream"})

    def route_amz_good(self) -> None:
        self.send_body(200, BODY, {"x-amz-checksum-sha256": b64(hashlib.sha256(BODY).digest())})

    def route_amz_bad(self) -> None:
        self.send_body(200, BODY, {"x-amz-checksum-sha256": b64(hashlib.sha256(b"x").digest())})

    def route_amz_multipart(self) -> None:  # a checksum of part checksums: not verifiable
        self.send_body(200, BODY, {"x-amz-checksum-sha256": b64(bytes(32)) + "-3"})

    def route_goog_good(self) -> None:
        md5 = b64(hashlib.md5(BODY).digest())
        self.send_body(200, BODY, {"x-goog-hash": f"crc32c=AAAAAA==,md5={md5}"})

    def route_goog_bad(self) -> None:
        self.send_body(200, BODY, {"x-goog-hash": f"crc32c=AAAAAA==,md5={b64(bytes(16))}"})

    def route_goog_crc_only(self) -> None:
        self.send_body(200, BODY, {"x-goog-hash": "crc32c=AAAAAA=="})

    def route_goog_transcoded(self) -> None:  # hash of the stored gzip, body decompressed
        self.send_body(200, BODY, {"x-goog-hash": f"md5={b64(bytes(16))}",
                                   "x-goog-stored-content-encoding": "gzip"})

    def route_content_md5_bad(self) -> None:
        self.send_body(200, BODY, {"Content-MD5": b64(bytes(16))})

    def route_gzip(self) -> None:  # 8 MiB of zeros in ~8 KiB: stored as sent, never inflated
        self.send_body(200, gzip.compress(bytes(8 * MiB)), {"Content-Encoding": "gzip"})

    def route_big(self) -> None:  # /big/<size>/<token>
        size = int(self.segments[1])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = bytes(64 * KiB)
        for offset in range(0, size, len(chunk)):
            self.wfile.write(chunk[: size - offset])

    def route_chunked_file(self) -> None:  # BODY in chunked framing, in uneven chunks
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(BODY), 3000):
            piece = BODY[start:start + 3000]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    # bodies that lie or never end
    def route_short(self) -> None:  # says twice the bytes it sends, then hangs up
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
        self.close_connection = True

    def route_lying(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(BODY[:100] + b"x" * LIE_EXTRA)
        self.close_connection = True

    def route_huge_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(BODY)
        self.close_connection = True

    def route_endless(self) -> None:  # no Content-Length: the body ends when the socket does
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for _ in range(SERVER_STREAM_CAP // STREAM_CHUNK):
            self.wfile.write(bytes(STREAM_CHUNK))

    def route_chunked(self) -> None:  # endless chunked transfer encoding
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        frame = f"{STREAM_CHUNK:x}\r\n".encode() + bytes(STREAM_CHUNK) + b"\r\n"
        for _ in range(SERVER_STREAM_CAP // STREAM_CHUNK):
            self.wfile.write(frame)
        self.close_connection = True

    # slow bodies
    def route_drip(self) -> None:  # some bytes, then silence longer than the read timeout
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY[:10])
        self.wfile.flush()
        time.sleep(DRIP_PAUSE_S)
        self.wfile.write(BODY[10:])

    def route_trickle(self) -> None:  # a byte at a time, never silent for long
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        started = time.monotonic()
        for byte in BODY:
            if time.monotonic() - started > TRICKLE_MAX_S:
                break
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(TRICKLE_INTERVAL_S)
        self.close_connection = True

    # status codes
    def route_flaky(self) -> None:  # 503 on the first hit, then the file
        if self.hit == 1:
            self.send_body(503, b"slow down")
        else:
            self.route_file()

    def route_always_503(self) -> None:
        self.send_body(503, b"slow down")

    def route_missing(self) -> None:
        self.send_body(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def route_denied(self) -> None:  # S3 quotes the signature it got: it must not leak
        body = (f"<Error><Code>SignatureDoesNotMatch</Code>"
                f"<SignatureProvided>{SECRET}</SignatureProvided></Error>").encode()
        self.send_body(403, body, {"Content-Type": "application/xml"})

    def route_reset(self) -> None:  # hang up without answering
        self.close_connection = True

    # redirects (the query string travels along, as a pre-signed chain's would)
    def route_loop_a(self) -> None:
        self.redirect(f"/loop-b/{self.token()}{self.query}")

    def route_loop_b(self) -> None:
        self.redirect(f"/loop-a/{self.token()}{self.query}")

    def route_chain(self) -> None:  # /chain/<n>/<token>: n redirects, then the file
        remaining = int(self.segments[1])
        if remaining == 0:
            self.route_file()
        else:
            self.redirect(f"/chain/{remaining - 1}/{self.token()}{self.query}", 307)

    def route_relative(self) -> None:
        self.redirect(f"../file/{self.token()}")

    def route_to(self) -> None:  # /to/<host>/<token>: to the same port under another host
        host = self.segments[1]
        self.redirect(f"http://{host}:{self.server.port}/file/{self.token()}{self.query}")

    def route_no_location(self) -> None:
        self.send_body(302)

    def route_ftp(self) -> None:
        self.redirect("ftp://127.0.0.1/file")


class AdversarialServer(ThreadingHTTPServer):
    """Counts every accepted connection, every request per path and each Host header."""

    daemon_threads = True

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.connections = 0
        self.hits: Counter[str] = Counter()
        self.host_headers: list[str] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    def record(self, path: str, host: str) -> int:
        with self.lock:
            self.hits[path] += 1
            self.host_headers.append(host)
            return self.hits[path]


@contextlib.contextmanager
def serve(server: AdversarialServer) -> Iterator[AdversarialServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[AdversarialServer]:
    with serve(AdversarialServer()) as running:
        yield running


@pytest.fixture(autouse=True)
def downloads_stay_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successful fetch leaves its file to the caller: here, to pytest's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def token() -> str:
    return uuid.uuid4().hex[:10]


LOCAL = FetchPolicy(
    allow_http=True, extra_allowed_hosts=("127.0.0.1",), allowed_networks=("127.0.0.1/32",),
    max_bytes=MAX_BYTES, connect_timeout_s=2, read_timeout_s=2, total_timeout_s=10,
    max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, hash_body=True)


def local(**changes: object) -> FetchPolicy:
    return FetchPolicy(**{**LOCAL.model_dump(), **changes})


def fetch(url: str, policy: FetchPolicy = LOCAL, **kwargs: object) -> FetchedFile:
    return asyncio.run(fetch_to_file(url, policy, **kwargs))  # type: ignore[arg-type]


def fetch_error(url: str, policy: FetchPolicy = LOCAL, **kwargs: object) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, policy, **kwargs)
    return info.value


class FakeResolver:
    """Answers every lookup from a script, and counts the lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records what it is asked to dial; dials through `inner`, or refuses without one."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None,
                 fail_with: Exception | None = None) -> None:
        self.inner = inner
        self.fail_with = fail_with
        self.dialled: list[tuple[str, int, float | None]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None,  # type: ignore[no-untyped-def]
                          socket_options=None):
        self.dialled.append((host, port, timeout))
        if self.inner is None:
            raise self.fail_with or httpcore.ConnectError("the test backend dials nothing")
        return await self.inner.connect_tcp(host, port, timeout=timeout,
                                            local_address=local_address,
                                            socket_options=socket_options)


# --- success, integrity --------------------------------------------------------------------


def test_fetches_a_file(server: AdversarialServer, tmp_path: Path) -> None:
    path = f"/file/{token()}"
    result = fetch(server.url(path), directory=tmp_path)
    assert result.path.parent == tmp_path
    assert result.path.read_bytes() == BODY
    assert (result.size, result.sha256) == (len(BODY), BODY_SHA256)
    assert result.content_type == "application/octet-stream"
    assert server.hits[path] == 1


def test_default_policy_skips_the_digest_but_still_verifies_store_checksums(
        server: AdversarialServer, tmp_path: Path) -> None:
    default = local(hash_body=False)
    assert FetchPolicy().hash_body is False
    plain = fetch(server.url(f"/file/{token()}"), default)
    assert (plain.sha256, plain.path.read_bytes()) == (None, BODY)
    assert fetch(server.url(f"/amz-good/{token()}"), default).sha256 == BODY_SHA256
    assert fetch(server.url(f"/file/{token()}"), default,
                 expected_sha256=BODY_SHA256).sha256 == BODY_SHA256
    error = fetch_error(server.url(f"/amz-bad/{token()}"), default, directory=tmp_path)
    assert (error.status, error.reason) == (422, "integrity")


@pytest.fixture
def straight_from_socket(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the length of every body received by SocketStream.receive_body."""
    lengths: list[int] = []
    original = SocketStream.receive_body

    async def spy(self: SocketStream, length: int, *args: object, **kwargs: object) -> None:
        lengths.append(length)
        await original(self, length, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SocketStream, "receive_body", spy)
    return lengths


@pytest.mark.timeout(60)
def test_bodies_with_a_length_stream_straight_from_the_socket(
        server: AdversarialServer, tmp_path: Path, straight_from_socket: list[int]) -> None:
    size = 9 * MiB + 123  # more than two of the receive buffers, and not a multiple
    result = fetch(server.url(f"/big/{size}/{token()}"), local(max_bytes=16 * MiB),
                   directory=tmp_path)
    assert result.sha256 == hashlib.sha256(bytes(size)).hexdigest()
    assert result.path.stat().st_size == size
    assert straight_from_socket == [size]


def test_chunked_bodies_go_through_httpcore(server: AdversarialServer,
                                            straight_from_socket: list[int]) -> None:
    result = fetch(server.url(f"/chunked-file/{token()}"))
    assert (result.path.read_bytes(), result.sha256) == (BODY, BODY_SHA256)
    assert straight_from_socket == []


def test_body_cut_short_is_retried_then_fails(server: AdversarialServer, tmp_path: Path) -> None:
    path = f"/short/{token()}"
    error = fetch_error(server.url(path), directory=tmp_path)
    assert (error.status, error.reason) == (502, "upstream_error")
    assert "connection closed early" in error.message
    assert server.hits[path] == LOCAL.max_attempts
    assert list(tmp_path.iterdir()) == []


def test_body_of_exactly_max_bytes_is_accepted(server: AdversarialServer) -> None:
    result = fetch(server.url(f"/file/{token()}"), local(max_bytes=len(BODY)))
    assert result.size == len(BODY)


@pytest.mark.parametrize("route", ["amz-good", "amz-multipart", "goog-good", "goog-crc-only",
                                   "goog-transcoded"])
def test_store_checksums_verified_or_skipped(server: AdversarialServer, route: str) -> None:
    assert fetch(server.url(f"/{route}/{token()}")).sha256 == BODY_SHA256


@pytest.mark.parametrize("route", ["amz-bad", "goog-bad", "content-md5-bad"])
def test_store_checksum_mismatch_fails(server: AdversarialServer, tmp_path: Path,
                                       route: str) -> None:
    path = f"/{route}/{token()}"
    error = fetch_error(server.url(path), directory=tmp_path)
    assert (error.status, error.reason) == (422, "integrity")
    assert server.hits[path] == 1  # not retried
    assert list(tmp_path.iterdir()) == []


def test_expected_sha256(server: AdversarialServer, tmp_path: Path) -> None:
    assert fetch(server.url(f"/file/{token()}"), expected_sha256=BODY_SHA256.upper()).size
    failed = tmp_path / "failed"
    failed.mkdir()
    error = fetch_error(server.url(f"/file/{token()}"), expected_sha256="0" * 64,
                        directory=failed)
    assert (error.status, error.reason) == (422, "integrity")
    assert "expected_sha256" in error.message
    assert list(failed.iterdir()) == []


def test_malformed_expected_sha256_is_refused_before_any_connection(
        server: AdversarialServer) -> None:
    before = server.connections
    error = fetch_error(server.url(f"/file/{token()}"), expected_sha256="abc")
    assert (error.status, error.reason) == (400, "refused")
    assert server.connections == before


def test_compressed_body_is_stored_as_sent(server: AdversarialServer) -> None:
    # 8 MiB once inflated, over the 1 MiB cap: a gzip bomb is never inflated.
    result = fetch(server.url(f"/gzip/{token()}"))
    assert result.size < 64 * KiB
    assert gzip.decompress(result.path.read_bytes()) == bytes(8 * MiB)


# --- size limits ---------------------------------------------------------------------------


def test_declared_length_over_the_cap_fails_before_the_body(server: AdversarialServer,
                                                            tmp_path: Path) -> None:
    path = f"/huge-declared/{token()}"
    error = fetch_error(server.url(path), directory=tmp_path)
    assert (error.status, error.reason) == (413, "too_large")
    assert "Content-Length" in error.message
    assert server.hits[path] == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("route", ["endless", "chunked"])
def test_body_without_length_is_cut_at_the_cap(server: AdversarialServer, tmp_path: Path,
                                               route: str) -> None:
    path = f"/{route}/{token()}"
    error = fetch_error(server.url(path), local(max_bytes=256 * KiB), directory=tmp_path)
    assert (error.status, error.reason) == (413, "too_large")
    assert server.hits[path] == 1  # not retried
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


def test_lying_content_length_yields_only_the_declared_bytes(server: AdversarialServer) -> None:
    # HTTP framing follows Content-Length: the extra megabytes are never read.
    result = fetch(server.url(f"/lying/{token()}"), local(max_bytes=256 * KiB))
    assert result.size == 100
    assert result.path.read_bytes() == BODY[:100]


@pytest.mark.timeout(60)
def test_memory_stays_bounded_while_streaming(server: AdversarialServer, tmp_path: Path) -> None:
    size = 48 * MiB
    tracemalloc.start()
    try:
        result = fetch(server.url(f"/big/{size}/{token()}"), local(max_bytes=64 * MiB),
                       directory=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == size
    assert result.sha256 == hashlib.sha256(bytes(size)).hexdigest()
    assert peak < 16 * MiB, f"peak Python allocations {peak / MiB:.1f} MiB"


# --- timeouts and the deadline -------------------------------------------------------------


@pytest.mark.timeout(15)
def test_silence_past_the_read_timeout_is_retried_then_504(server: AdversarialServer,
                                                           tmp_path: Path) -> None:
    path = f"/drip/{token()}"
    started = time.monotonic()
    error = fetch_error(server.url(path), local(read_timeout_s=0.3, max_attempts=2),
                        directory=tmp_path)
    assert (error.status, error.reason) == (504, "timeout")
    assert "read timeout" in error.message
    assert server.hits[path] == 2
    assert time.monotonic() - started < DRIP_PAUSE_S + 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(15)
def test_total_timeout_ends_a_trickle(server: AdversarialServer, tmp_path: Path) -> None:
    path = f"/trickle/{token()}"
    started = time.monotonic()
    error = fetch_error(server.url(path), local(read_timeout_s=1, total_timeout_s=0.5),
                        directory=tmp_path)
    elapsed = time.monotonic() - started
    assert (error.status, error.reason) == (504, "timeout")
    assert 0.5 <= elapsed < 1.5
    assert server.hits[path] == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(15)
def test_deadline_caps_the_total_timeout(server: AdversarialServer) -> None:
    started = time.monotonic()
    error = fetch_error(server.url(f"/trickle/{token()}"), local(total_timeout_s=30),
                        deadline=started + 0.4)
    assert error.reason == "timeout"
    assert time.monotonic() - started < 1.2


def test_passed_deadline_fails_without_connecting(server: AdversarialServer) -> None:
    before = server.connections
    error = fetch_error(server.url(f"/file/{token()}"), deadline=time.monotonic() - 1)
    assert (error.status, error.reason) == (504, "timeout")
    assert server.connections == before


def test_connect_timeout_is_passed_down_and_retried() -> None:
    backend = RecordingBackend(fail_with=httpcore.ConnectTimeout("timed out"))
    error = fetch_error("http://slow.example.test/x", local(extra_allowed_hosts=("*.test",),
                                                            connect_timeout_s=0.7),
                        resolver=FakeResolver(["127.0.0.1"]), network_backend=backend)
    assert (error.status, error.reason) == (504, "timeout")
    assert backend.dialled == [("127.0.0.1", 80, 0.7)] * LOCAL.max_attempts


@pytest.mark.timeout(15)
def test_cancellation_leaves_no_file(server: AdversarialServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(
            fetch_to_file(server.url(f"/trickle/{token()}"), LOCAL, directory=tmp_path))
        await asyncio.sleep(0.3)
        assert len(list(tmp_path.iterdir())) == 1  # the partial file
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert list(tmp_path.iterdir()) == []


# --- retries -------------------------------------------------------------------------------


def test_503_then_200_is_retried(server: AdversarialServer) -> None:
    path = f"/flaky/{token()}"
    assert fetch(server.url(path)).sha256 == BODY_SHA256
    assert server.hits[path] == 2


def test_persistent_503_fails_after_max_attempts(server: AdversarialServer) -> None:
    path = f"/always-503/{token()}"
    error = fetch_error(server.url(path))
    assert (error.status, error.reason) == (502, "upstream_error")
    assert "503" in error.message and "3 attempts" in error.message
    assert server.hits[path] == LOCAL.max_attempts


def test_404_is_not_retried(server: AdversarialServer, tmp_path: Path) -> None:
    path = f"/missing/{token()}"
    error = fetch_error(server.url(path), directory=tmp_path)
    assert (error.status, error.reason) == (422, "not_found")
    assert "404" in error.message and f"127.0.0.1:{server.port}{path}" in error.message
    assert server.hits[path] == 1
    assert list(tmp_path.iterdir()) == []


def test_403_names_the_store_error_code_but_never_the_body(server: AdversarialServer) -> None:
    path = f"/denied/{token()}"
    error = fetch_error(server.url(path))
    assert (error.status, error.reason) == (422, "upstream_error")
    assert "403 (SignatureDoesNotMatch)" in error.message
    assert SECRET not in str(error)
    assert server.hits[path] == 1


def test_dropped_connection_is_retried(server: AdversarialServer) -> None:
    path = f"/reset/{token()}"
    error = fetch_error(server.url(path))
    assert (error.status, error.reason) == (502, "upstream_error")
    assert server.hits[path] == LOCAL.max_attempts


def test_refused_connection_is_retried_then_fails() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = fetch_error(f"http://127.0.0.1:{port}/file")
    assert (error.status, error.reason) == (502, "upstream_error")
    assert "could not connect" in error.message


def test_backoff_grows_with_jitter_and_stays_capped() -> None:
    policy = FetchPolicy(backoff_initial_s=1, backoff_max_s=5)
    for attempt, step in [(1, 1), (2, 2), (3, 4), (4, 5), (10, 5)]:
        delays = {fetch_module._backoff_s(attempt, policy) for _ in range(50)}
        assert all(step * 0.5 <= d <= step for d in delays)
        assert len(delays) > 1  # jittered


# --- redirects -----------------------------------------------------------------------------


def test_redirect_loop_is_detected(server: AdversarialServer) -> None:
    tok = token()
    error = fetch_error(server.url(f"/loop-a/{tok}"))
    assert (error.status, error.reason) == (422, "upstream_error")
    assert "redirect loop" in error.message
    assert (server.hits[f"/loop-a/{tok}"], server.hits[f"/loop-b/{tok}"]) == (1, 1)


def test_redirects_are_followed_up_to_the_limit(server: AdversarialServer) -> None:
    assert fetch(server.url(f"/chain/3/{token()}"), local(max_redirects=3)).size == len(BODY)
    tok = token()
    error = fetch_error(server.url(f"/chain/4/{tok}"), local(max_redirects=3))
    assert (error.status, error.reason) == (422, "upstream_error")
    assert "more than 3 redirects" in error.message
    assert server.hits[f"/chain/0/{tok}"] == 0


def test_relative_redirect_is_resolved(server: AdversarialServer) -> None:
    tok = token()
    assert fetch(server.url(f"/relative/{tok}")).sha256 == BODY_SHA256
    assert server.hits[f"/file/{tok}"] == 1


def test_redirect_without_location_fails(server: AdversarialServer) -> None:
    assert fetch_error(server.url(f"/no-location/{token()}")).reason == "upstream_error"


def test_redirect_to_a_refused_scheme(server: AdversarialServer) -> None:
    error = fetch_error(server.url(f"/ftp/{token()}"))
    assert (error.status, error.reason) == (400, "refused")
    assert "redirect" in error.message


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "[::1]", "0x7f000002"])
def test_redirect_to_another_loopback_host_is_rechecked_and_refused(
        server: AdversarialServer, host: str) -> None:
    tok = token()
    error = fetch_error(server.url(f"/to/{host}/{tok}"))
    assert (error.status, error.reason) == (400, "refused")
    assert server.hits[f"/to/{host}/{tok}"] == 1
    assert server.hits[f"/file/{tok}"] == 0


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f000001"])
def test_redirect_to_another_spelling_of_the_allowed_address(server: AdversarialServer,
                                                             host: str) -> None:
    # Hosts are judged by the address they spell: these ARE 127.0.0.1/32, which LOCAL allows.
    tok = token()
    assert fetch(server.url(f"/to/{host}/{tok}")).sha256 == BODY_SHA256
    assert server.hits[f"/file/{tok}"] == 1


# --- the address policy, end to end on loopback --------------------------------------------


@pytest.mark.parametrize("host", SPELLINGS_OF_LOOPBACK)
def test_loopback_spellings_are_refused_without_connecting(server: AdversarialServer,
                                                           tmp_path: Path, host: str) -> None:
    # Default address rules; http and every host pattern allowed, so the address check
    # (after the system resolver, for `localhost`) is what refuses.
    policy = FetchPolicy(allow_http=True, extra_allowed_hosts=("*",))
    before = server.connections
    error = fetch_error(server.url(f"/file/{token()}", host=host), policy, directory=tmp_path)
    assert (error.status, error.reason) == (400, "refused")
    assert "not public" in error.message
    assert server.connections == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("host", [h for h in SPELLINGS_OF_LOOPBACK if "localhost" not in h.lower()])
def test_numeric_loopback_spellings_are_addresses_not_names(host: str) -> None:
    address = parse_ip_literal(host.rstrip("."))
    assert address is not None  # never handed to a resolver as a name
    if isinstance(address, ipaddress.IPv6Address):
        address = embedded_ipv4(address) or address
    assert address.is_loopback


def test_pinned_to_the_resolved_address_with_the_hostname_in_host(
        server: AdversarialServer) -> None:
    resolver = FakeResolver(["127.0.0.1"])
    backend = RecordingBackend(inner=httpcore.AnyIOBackend())
    policy = local(extra_allowed_hosts=("*.example.test",))
    result = fetch(server.url(f"/file/{token()}", host="media.example.test"), policy,
                   resolver=resolver, network_backend=backend)
    assert result.sha256 == BODY_SHA256
    assert resolver.calls == [("media.example.test", server.port)]
    assert backend.dialled == [("127.0.0.1", server.port, policy.connect_timeout_s)]
    assert server.host_headers[-1] == f"media.example.test:{server.port}"


def test_dns_is_asked_once_per_hop_so_rebinding_cannot_swap_the_address(
        server: AdversarialServer) -> None:
    # The second answer would be a private address: it must never be asked for.
    resolver = FakeResolver(["127.0.0.1"], ["10.0.0.1"])
    backend = RecordingBackend(inner=httpcore.AnyIOBackend())
    path = f"/flaky/{token()}"
    result = fetch(server.url(path, host="media.example.test"),
                   local(extra_allowed_hosts=("*.example.test",)),
                   resolver=resolver, network_backend=backend)
    assert result.sha256 == BODY_SHA256
    assert server.hits[path] == 2
    assert len(resolver.calls) == 1
    assert [host for host, _, _ in backend.dialled] == ["127.0.0.1", "127.0.0.1"]


def test_each_redirect_hop_is_resolved_and_checked(server: AdversarialServer) -> None:
    # Hop 1 resolves to the allowed loopback address, hop 2's host to a private one.
    resolver = FakeResolver(["127.0.0.1"], ["10.1.2.3"])
    backend = RecordingBackend(inner=httpcore.AnyIOBackend())
    tok = token()
    error = fetch_error(server.url(f"/to/second.example.test/{tok}", host="first.example.test"),
                        local(extra_allowed_hosts=("*.example.test",)),
                        resolver=resolver, network_backend=backend)
    assert (error.status, error.reason) == (400, "refused")
    assert [host for host, _ in resolver.calls] == ["first.example.test", "second.example.test"]
    assert len(backend.dialled) == 1
    assert server.hits[f"/file/{tok}"] == 0


NON_PUBLIC = [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.254", "127.0.0.1",
    "127.255.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250",
    "255.255.255.255", "240.0.0.1", "198.18.0.1", "192.0.0.8",
    "::1", "::", "fd00::1", "fc00::1", "fe80::1", "fe80::1%eth0", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",
    "::127.0.0.1", "::10.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2002:0a00:0001::",
]


@pytest.mark.parametrize("ip", NON_PUBLIC)
def test_check_address_refuses_non_public(ip: str) -> None:
    with pytest.raises(FetchError) as info:
        check_address(ip, FetchPolicy())
    assert (info.value.status, info.value.reason) == (400, "refused")


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888",
                                "::ffff:8.8.8.8", "2002:0808:0808::1"])
def test_check_address_accepts_public(ip: str) -> None:
    check_address(ip, FetchPolicy())  # only judged: nothing is dialled here


def test_check_address_honours_allowed_networks() -> None:
    policy = FetchPolicy(allowed_networks=("10.0.0.0/8", "fd12::/16"))
    for ip in ("10.1.2.3", "::ffff:10.1.2.3", "fd12::5"):
        check_address(ip, policy)
    with pytest.raises(FetchError):
        check_address("192.168.0.1", policy)
    with pytest.raises(FetchError):
        check_address("not-an-ip", policy)


@pytest.mark.parametrize("answers", [[ip] for ip in NON_PUBLIC] + [["127.0.0.1", "10.0.0.1"]])
def test_resolver_answers_are_checked_before_any_connection(answers: list[str]) -> None:
    resolver = FakeResolver(answers)
    backend = RecordingBackend()  # refuses to dial, and records any attempt
    policy = FetchPolicy(allow_http=True, extra_allowed_hosts=("*.example.test",),
                         allowed_networks=("127.0.0.1/32",) if len(answers) > 1 else ())
    error = fetch_error("https://files.example.test/object?X-Amz-Signature=x", policy,
                        resolver=resolver, network_backend=backend)
    assert (error.status, error.reason) == (400, "refused")
    assert len(resolver.calls) == 1
    assert backend.dialled == []


def test_unresolvable_host_is_not_retried() -> None:
    class NoSuchHost:
        calls = 0

        async def __call__(self, host: str, port: int) -> list[str]:
            NoSuchHost.calls += 1
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    error = fetch_error("https://nowhere.example.test/x",
                        FetchPolicy(extra_allowed_hosts=("*.test",)), resolver=NoSuchHost())
    assert (error.status, error.reason) == (422, "upstream_error")
    assert NoSuchHost.calls == 1


# --- URL policy ----------------------------------------------------------------------------

S3_GCS_AZURE = [
    "s3.amazonaws.com", "bucket.s3.amazonaws.com", "my.dotted.bucket.s3.amazonaws.com",
    "s3.us-west-2.amazonaws.com", "bucket.s3.us-west-2.amazonaws.com",
    "s3.dualstack.eu-west-1.amazonaws.com", "bucket.s3.dualstack.eu-west-1.amazonaws.com",
    "s3-us-west-2.amazonaws.com", "bucket.s3-us-west-2.amazonaws.com",
    "bucket.s3-fips.us-east-1.amazonaws.com", "s3.cn-north-1.amazonaws.com.cn",
    "ap-123456789012.s3-accesspoint.us-east-1.amazonaws.com",
    "storage.googleapis.com", "bucket.storage.googleapis.com",
    "account.blob.core.windows.net", "BUCKET.S3.AMAZONAWS.COM.",
]
NOT_STORES = [
    "ec2-203-0-113-5.compute-1.amazonaws.com", "amazonaws.com", "sqs.us-east-1.amazonaws.com",
    "s3.amazonaws.com.evil.test", "storage.googleapis.com.evil.test", "blob.core.windows.net",
    "metadata.google.internal", "localhost", "127.0.0.1", "evil.test",
]


@pytest.mark.parametrize("host", S3_GCS_AZURE)
def test_default_hosts_admit_object_stores(host: str) -> None:
    target = check_url(f"https://{host}/key?X-Amz-Signature=x", FetchPolicy())  # no I/O
    assert target.port == 443 and target.ip is None


@pytest.mark.parametrize("host", NOT_STORES)
def test_default_hosts_refuse_everything_else(host: str) -> None:
    with pytest.raises(FetchError) as info:
        check_url(f"https://{host}/key", FetchPolicy())
    assert (info.value.status, info.value.reason) == (400, "refused")


@pytest.mark.parametrize("url", [
    "http://bucket.s3.amazonaws.com/key",  # http by default
    "ftp://bucket.s3.amazonaws.com/key", "file:///etc/passwd", "bucket.s3.amazonaws.com/key",
    "https://user:pass@bucket.s3.amazonaws.com/key", "https:///key", "https://[::1/key",
    "https://0177.0.0.1/key",
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(FetchError) as info:
        check_url(url, FetchPolicy())
    assert (info.value.status, info.value.reason) == (400, "refused")


def test_ip_literal_hosts_need_a_pattern_or_a_network() -> None:
    with pytest.raises(FetchError):
        check_url("http://127.0.0.1/x", FetchPolicy(allow_http=True))
    assert check_url("http://127.1/x", FetchPolicy(
        allow_http=True, allowed_networks=("127.0.0.0/8",))).ip == "127.0.0.1"
    assert check_url("http://2130706433/x", FetchPolicy(
        allow_http=True, extra_allowed_hosts=("127.0.0.1",))).ip == "127.0.0.1"


def test_policy_is_frozen_and_validated() -> None:
    policy = FetchPolicy()
    with pytest.raises(pydantic.ValidationError):
        policy.max_bytes = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        FetchPolicy(allowed_networks=("not-a-network",))
    with pytest.raises(pydantic.ValidationError):
        FetchPolicy(max_attempts=0)
    assert FetchPolicy(extra_allowed_hosts=("Files.Example.TEST.",)).extra_allowed_hosts == (
        "files.example.test",)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://b.s3.amazonaws.com/k/e%20y?X-Amz-Signature=S&X-Amz-Credential=C#frag",
     "https://b.s3.amazonaws.com/k/e%20y"),
    ("https://user:pw@host.test:8443/p?sig=S", "https://host.test:8443/p"),
    ("http://[::1]:8080/p?sig=S", "http://[::1]:8080/p"),
    ("https://host.test?sig=S", "https://host.test"),
    ("not a url?sig=S", "<unparseable URL>"),
    ("https://[::1/x?sig=S", "<unparseable URL>"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --- secrets never logged ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_query_string_never_reaches_logs_or_errors(server: AdversarialServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything, httpx and httpcore included
    query = f"?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}"
    fetch(server.url(f"/file/{token()}{query}"))
    fetch(server.url(f"/flaky/{token()}{query}"))  # a retry warning
    fetch(server.url(f"/chain/2/{token()}{query}"))  # redirects carry the query
    errors = [fetch_error(server.url(f"/{route}/{token()}{query}"), local(max_attempts=2))
              for route in ("missing", "denied", "always-503", "loop-a", "amz-bad", "reset")]
    errors.append(fetch_error(server.url(f"/to/localhost/{token()}{query}")))
    errors.append(fetch_error(server.url(f"/file/{token()}{query}", host="localhost"),
                              FetchPolicy(allow_http=True, extra_allowed_hosts=("*",))))
    errors.append(fetch_error(server.url(f"/trickle/{token()}{query}"),
                              local(total_timeout_s=0.3)))

    formatter = logging.Formatter("%(name)s %(message)s")
    texts = [formatter.format(record) for record in caplog.records]
    texts += [str(error) for error in errors] + [repr(error) for error in errors]
    assert any("truss_llm.media.fetch" in text and "retrying" in text for text in texts)
    assert any(f"127.0.0.1:{server.port}/missing/" in text for text in texts)
    leaks = [text for text in texts if SECRET in text]
    assert not leaks, leaks


# --- TLS: pinned dialling keeps hostname verification ---------------------------------------


def _make_tls(tmp_path: Path, hostname: str) -> ssl.SSLContext:
    """A throwaway CA, written to tmp_path/ca.pem, and a server context whose certificate,
    signed by it, names `hostname`."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool):  # type: ignore[no-untyped-def]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_cert = certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf_cert = certificate(hostname, leaf_key, "test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf_cert.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return server_context


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inner", [SocketBackend, httpcore.AnyIOBackend])
def test_https_dials_the_pinned_address_and_verifies_the_hostname(
        tmp_path: Path, straight_from_socket: list[int],
        inner: type[httpcore.AsyncNetworkBackend]) -> None:
    # SocketBackend is the default; httpcore's AnyIO backend takes the body through httpcore.
    server_context = _make_tls(tmp_path, "media.example.test")
    sni_names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: sni_names.append(name)  # type: ignore[assignment,misc,return-value]
    policy = FetchPolicy(extra_allowed_hosts=("*.example.test",),
                         allowed_networks=("127.0.0.1/32",), backoff_initial_s=0.01,
                         max_bytes=16 * MiB, hash_body=True, ca_file=str(tmp_path / "ca.pem"))
    with serve(AdversarialServer(server_context)) as tls_server:
        url = tls_server.url(f"/file/{token()}", host="media.example.test", scheme="https")
        backend = RecordingBackend(inner=inner())
        result = fetch(url, policy, resolver=FakeResolver(["127.0.0.1"]),
                       network_backend=backend)
        assert result.sha256 == BODY_SHA256
        assert [host for host, _, _ in backend.dialled] == ["127.0.0.1"]
        assert sni_names == ["media.example.test"]
        assert tls_server.host_headers[-1] == f"media.example.test:{tls_server.port}"
        # Many TLS records, more than two receive buffers.
        size = 9 * MiB + 7
        big = tls_server.url(f"/big/{size}/{token()}", host="media.example.test",
                             scheme="https")
        result = fetch(big, policy, resolver=FakeResolver(["127.0.0.1"]),
                       network_backend=RecordingBackend(inner=inner()))
        assert result.sha256 == hashlib.sha256(bytes(size)).hexdigest()
        assert straight_from_socket == ([len(BODY), size] if inner is SocketBackend else [])
        # Same address, another name: the certificate does not match; no retry can help.
        wrong = tls_server.url(f"/file/{token()}", host="other.example.test", scheme="https")
        backend = RecordingBackend(inner=inner())
        error = fetch_error(wrong, policy, resolver=FakeResolver(["127.0.0.1"]),
                            network_backend=backend)
        assert (error.status, error.reason) == (422, "upstream_error")
        assert "certificate" in error.message
        assert len(backend.dialled) == 1
        assert tls_server.hits[urlsplit(wrong).path] == 0


def test_the_system_cas_do_not_vouch_for_a_private_ca(tmp_path: Path) -> None:
    server_context = _make_tls(tmp_path, "media.example.test")
    policy = FetchPolicy(extra_allowed_hosts=("*.example.test",),
                         allowed_networks=("127.0.0.1/32",), backoff_initial_s=0.01)
    with serve(AdversarialServer(server_context)) as tls_server:
        url = tls_server.url(f"/file/{token()}", host="media.example.test", scheme="https")
        error = fetch_error(url, policy, resolver=FakeResolver(["127.0.0.1"]))
    assert (error.status, error.reason) == (422, "upstream_error")
    assert "certificate" in error.message


def test_ca_file_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="ca_file"):
        FetchPolicy(ca_file=str(tmp_path / "missing.pem"))


@pytest.mark.timeout(60)
def test_concurrent_fetches_each_get_their_own_bytes(server: AdversarialServer, tmp_path: Path,
                                                     straight_from_socket: list[int]) -> None:
    sizes = [1 * MiB + 17 * n for n in range(16)]  # distinct sizes, so a mix-up shows

    async def scenario() -> list[FetchedFile]:
        policy = local(max_bytes=4 * MiB)
        return await asyncio.gather(*(
            fetch_to_file(server.url(f"/big/{size}/{token()}"), policy, directory=tmp_path)
            for size in sizes))

    results = asyncio.run(scenario())
    for size, result in zip(sizes, results, strict=True):
        assert result.size == result.path.stat().st_size == size
        assert result.sha256 == hashlib.sha256(bytes(size)).hexdigest()
    assert sorted(straight_from_socket) == sorted(sizes)
