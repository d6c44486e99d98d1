"""Fetch one URL to a local file, safely and within bounds.

Large inputs reach the model as pre-signed object-store URLs. This module downloads one to a
temporary file without trusting anything the URL or the server says:

* the URL, and every redirect hop, is judged by `policy` (scheme, host allow-list); the
  host is resolved once per hop, every address is checked, and the TCP connection is
  pinned to the checked address by a network backend that cannot dial anything else (the
  hostname still goes into SNI, certificate checking and the Host header);
* the size cap holds whatever Content-Length says, and the body is never held whole in
  memory. A body with a Content-Length (an object store's GET) is read straight from the
  socket by worker threads (`socket_backend.SocketStream.receive_body`), at curl's speed;
  any other body streams through httpcore in batches written on a worker thread. A failed
  fetch leaves no file behind;
* connect, read-gap and total timeouts, the total never past the caller's deadline;
  timeouts, connection errors and 5xx are retried with jittered exponential backoff, a 4xx
  fails at once;
* checksums (the caller's sha256, or the store's x-amz-checksum-sha256, x-goog-hash md5 and
  Content-MD5) are verified when present;
* httpx's client is not used: it logs full URLs, and a pre-signed URL's query string is a
  credential. Logs and errors name host and path only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import functools
import hashlib
import ipaddress
import logging
import os
import random
import re
import socket
import ssl
import tempfile
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import httpcore
import httpx

from truss_llm.media.policy import (
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_MAX_BYTES,
    FetchError,
    FetchPolicy,
    Target,
    check_address,
    check_url,
    dial_address,
    redact_url,
    refused,
)
from truss_llm.media.socket_backend import SocketBackend, SocketStream

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_MAX_BYTES",
    "FetchError",
    "FetchPolicy",
    "FetchedFile",
    "Resolver",
    "check_address",
    "fetch_to_file",
    "redact_url",
    "system_resolver",
]

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]

MiB = 1024 * 1024
# Bytes gathered before one hash-and-write on the worker thread. Two batches live at once
# (one being written, one being filled): the fetch's memory is about twice this.
WRITE_BATCH_BYTES = 4 * MiB
IO_THREADS = 4  # shared by all fetches; each fetch keeps at most one batch in flight
ERROR_BODY_PEEK_BYTES = 4096  # enough for an S3/GCS/Azure XML error's <Code>
TEMP_FILE_PREFIX = "truss-llm-fetch-"
USER_AGENT = "truss-llm-media-fetch/1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BACKOFF_JITTER = 0.5  # each delay is drawn from [1 - jitter, 1] x the exponential step
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Loggers that print request URLs or response headers: httpx logs every request's URL at
# INFO, httpcore its headers (a redirect's Location) at DEBUG.
URL_LOGGERS = ("httpx", "httpcore.connection", "httpcore.connection_pool", "httpcore.http11",
               "httpcore.http2", "httpcore.proxy", "httpcore.socks")
_FINAL_DNS_ERRORS = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name))


class _QueryRedactingFilter(logging.Filter):
    """Blanks query strings in what httpx and httpcore log.

    httpx logs every request's full URL at INFO (a pre-signed URL's signature, a webhook's
    token); with DEBUG on, httpcore logs every response's headers, and a redirect's
    Location carries the next hop's pre-signed query. Neither offers a per-request switch,
    so their loggers get this filter: any `?key=value...` token loses everything after `?`.
    """

    _QUERY = re.compile(r"\?[^\s'\"]*=[^\s'\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: logging reports it itself
            return True
        if "?" in message:
            record.msg, record.args = self._QUERY.sub("?<redacted>", message), ()
        return True


def install_url_redaction() -> None:
    """Idempotent; every module that makes HTTP calls with secrets in URLs calls it."""
    for name in URL_LOGGERS:
        url_logger = logging.getLogger(name)
        if not any(isinstance(f, _QueryRedactingFilter) for f in url_logger.filters):
            url_logger.addFilter(_QueryRedactingFilter())


install_url_redaction()


@dataclass(frozen=True)
class FetchedFile:
    """A downloaded file; the caller owns it and deletes it when done."""

    path: Path
    size: int
    sha256: str | None  # hex digest of the bytes on disk; None if the policy skipped hashing
    content_type: str | None


# --- errors that may be retried -------------------------------------------------------------


class _Transient(Exception):
    """A failure worth another attempt: a timeout, a broken connection or a 5xx."""

    def __init__(self, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.timed_out = timed_out

    def final(self, shown: str, attempts: int) -> FetchError:
        # The store failed us, not the caller: a gateway's statuses, which clients (and
        # the async worker) retry, where a 4xx would tell them not to.
        tries = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
        if self.timed_out:
            return FetchError(HTTPStatus.GATEWAY_TIMEOUT, FetchError.TIMEOUT,
                              f"{shown}: {self.detail} ({tries})")
        return FetchError(HTTPStatus.BAD_GATEWAY, FetchError.UPSTREAM_ERROR,
                          f"{shown}: {self.detail} ({tries})")


def _describe_transport_error(exc: httpx.TransportError, policy: FetchPolicy) -> _Transient:
    # The exception's own text can come from the server (protocol errors); keep our words.
    if isinstance(exc, httpx.ConnectTimeout):
        return _Transient(f"connect timed out ({policy.connect_timeout_s:g} s)", timed_out=True)
    if isinstance(exc, httpx.TimeoutException):
        return _Transient(f"no data for {policy.read_timeout_s:g} s (read timeout)",
                          timed_out=True)
    if isinstance(exc, httpx.ConnectError):
        return _Transient("could not connect")
    if isinstance(exc, httpx.RemoteProtocolError):
        return _Transient("the server broke the HTTP exchange (connection closed early?)")
    return _Transient(f"transfer failed ({type(exc).__name__})")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --- the pinned connection --------------------------------------------------------------------


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials only the addresses checked for one host: no DNS, no other host, no sockets.

    httpcore hands `connect_tcp` the URL's host; this backend swaps it for the pinned
    address. TLS still verifies the certificate against the hostname, which httpcore passes
    to `start_tls` itself, and the Host header comes from the URL.
    """

    def __init__(self, host: str, addresses: Iterable[str],
                 inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._host = host
        self._addresses = tuple(addresses)
        self._inner = inner or SocketBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        if host.lower().strip("[]").rstrip(".") != self._host or not self._addresses:
            raise httpcore.ConnectError("refusing to dial a host that was not checked")
        failure: Exception = httpcore.ConnectError("no address to dial")
        for address in self._addresses:
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            if not _is_peer(stream, address):
                await stream.aclose()
                raise httpcore.ConnectError("connected to an address other than the pinned one")
            return stream
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never dialled")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _is_peer(stream: httpcore.AsyncNetworkStream, address: str) -> bool:
    """Belt and braces: is the socket's peer the address we meant to dial?"""
    peer = stream.get_extra_info("server_addr")
    if peer is None:  # a test backend without a socket
        return True
    return ipaddress.ip_address(dial_address(peer[0])) == ipaddress.ip_address(address)


# httpcore's exceptions as httpx's, which is what an httpx transport must raise.
_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise _mapped(exc)(str(exc)) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise _mapped(exc)(str(exc)) from exc


def _mapped(exc: Exception) -> type[httpx.TransportError]:
    for core_type, httpx_type in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, core_type):
            return httpx_type
    return httpx.TransportError


class _PinnedStream(httpx.AsyncByteStream):
    def __init__(self, inner: typing.AsyncIterable[bytes]) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._inner:
                yield part

    async def aclose(self) -> None:
        closer = getattr(self._inner, "aclose", None)
        if closer is not None:
            with _httpx_errors():
                await closer()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over httpcore whose connections go through a PinnedBackend.

    httpx's own AsyncHTTPTransport takes no network backend, so this is its request and
    response conversion over a pool built with one. One connection, no keep-alive: each
    attempt starts clean.
    """

    def __init__(self, backend: PinnedBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=1, max_keepalive_connections=0,
            http1=True, http2=False, retries=0, network_backend=backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=typing.cast(typing.AsyncIterable[bytes], request.stream),
            extensions=request.extensions)
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status, headers=response.headers,
            stream=_PinnedStream(typing.cast(typing.AsyncIterable[bytes], response.stream)),
            extensions=response.extensions, request=request)

    async def aclose(self) -> None:
        await self._pool.aclose()


@functools.lru_cache(maxsize=8)
def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    # Loading a CA bundle takes tens of milliseconds; one context per bundle serves every
    # fetch.
    if ca_file is not None:
        return ssl.create_default_context(cafile=ca_file)
    return httpx.create_ssl_context()


# --- writing the body ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _io_executor() -> concurrent.futures.ThreadPoolExecutor:
    # Not the loop's default executor: the server may fill that with blocking model work,
    # and a fetch must not queue behind it.
    return concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS,
                                                 thread_name_prefix="media-fetch-io")


class _FileSink:
    """Hashes and writes the body on a worker thread, one batch in flight at a time.

    Hashing (hashlib releases the GIL) and the write syscalls run beside the event loop
    reading the next batch; the loop never blocks on the disk. The file descriptor is
    closed only once no write is in flight, even when the fetch is cancelled mid-batch.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._inflight: concurrent.futures.Future[None] | None = None
        self._start_over(want_sha256=True, want_md5=False)

    async def reset(self, *, want_sha256: bool, want_md5: bool) -> None:
        """Start over (a new attempt): empty file, fresh hashes."""
        await self.drain()
        self._start_over(want_sha256=want_sha256, want_md5=want_md5)

    def _start_over(self, *, want_sha256: bool, want_md5: bool) -> None:
        # Only a retry has bytes to drop. Truncating an empty file is not free: ext4 then
        # takes the rewrite for a replace-via-truncate and flushes the whole file on close.
        if os.lseek(self._fd, 0, os.SEEK_CUR):
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        # sha256 of every byte costs about as much CPU as the download itself (0.75 s/GiB
        # here): computed only when the policy or a checksum asks for it.
        self.sha256 = hashlib.sha256() if want_sha256 else None
        self.md5 = hashlib.md5(usedforsecurity=False) if want_md5 else None

    async def write(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= WRITE_BATCH_BYTES:
            await self._submit()

    async def finish(self) -> None:
        await self._submit()
        await self.drain()

    async def drain(self) -> None:
        """Wait for the write in flight; its error (a full disk...) is raised here."""
        if self._inflight is not None:
            await asyncio.wrap_future(self._inflight)
            self._inflight = None

    async def _submit(self) -> None:
        await self.drain()
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._inflight = _io_executor().submit(self._hash_and_write, batch)

    def _hash_and_write(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self.write_now(memoryview(chunk))

    def write_now(self, view: memoryview) -> None:
        """Hash and write on the calling thread (a worker: never the event loop's)."""
        if self.sha256 is not None:
            self.sha256.update(view)
        if self.md5 is not None:
            self.md5.update(view)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self, then: Callable[[], None]) -> None:
        """Close the file and run `then`, at once or when the write in flight ends."""

        def close_now(_: object = None) -> None:
            os.close(self._fd)
            then()

        if self._inflight is None or self._inflight.done():
            close_now()
        else:
            self._inflight.add_done_callback(close_now)


# --- integrity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checksum:
    algorithm: str  # "sha256" or "md5"
    digest: bytes
    source: str  # where it came from, for the error message


def _b64_digest(value: str, length: int) -> bytes | None:
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest if len(digest) == length else None


def _store_checksums(headers: httpx.Headers) -> list[_Checksum]:
    """The checksums an object store sent that we know how to verify; unknown ones skipped.

    A multipart S3 object's checksum ("...-N") covers the parts, not the bytes, and GCS
    hashes the stored bytes, which differ from the served ones when it decompresses a gzip
    object on the way out: both are skipped.
    """
    found = []
    amz = headers.get("x-amz-checksum-sha256")
    if amz and "-" not in amz and (digest := _b64_digest(amz, 32)):
        found.append(_Checksum("sha256", digest, "x-amz-checksum-sha256"))
    stored_encoding = headers.get("x-goog-stored-content-encoding", "identity").lower()
    served_encoding = headers.get("content-encoding", "identity").lower()
    if stored_encoding in ("identity", served_encoding):
        for value in headers.get_list("x-goog-hash", split_commas=True):
            name, _, encoded = value.strip().partition("=")
            if name.lower() == "md5" and (digest := _b64_digest(encoded, 16)):
                found.append(_Checksum("md5", digest, "x-goog-hash"))
    content_md5 = headers.get("content-md5")
    if content_md5 and (digest := _b64_digest(content_md5, 16)):
        found.append(_Checksum("md5", digest, "Content-MD5"))
    return found


def _verify(sink: _FileSink, checksums: list[_Checksum], shown: str) -> None:
    for checksum in checksums:
        hasher = sink.sha256 if checksum.algorithm == "sha256" else sink.md5
        if hasher is not None and hasher.digest() != checksum.digest:
            raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.INTEGRITY,
                             f"{shown}: {checksum.algorithm} of the received bytes does not "
                             f"match {checksum.source}")


# --- one attempt at one hop -------------------------------------------------------------------


@dataclass(frozen=True)
class _Redirect:
    location: str


async def _error_code(response: httpx.Response) -> str:
    """The <Code> of an object store's XML error body (AccessDenied...), or "".

    Only that token is kept: S3's SignatureDoesNotMatch body quotes the signature.
    """
    seen = b""
    with contextlib.suppress(httpx.TransportError):
        async for chunk in response.aiter_raw():
            seen += chunk
            if len(seen) >= ERROR_BODY_PEEK_BYTES:
                break
    match = _ERROR_CODE.search(seen[:ERROR_BODY_PEEK_BYTES])
    return f" ({match.group(1).decode()})" if match else ""


def _declared_length(response: httpx.Response, shown: str) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                         f"{shown}: invalid Content-Length")
    return int(value)


def _too_large(shown: str, policy: FetchPolicy, what: str) -> FetchError:
    return FetchError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, FetchError.TOO_LARGE,
                      f"{shown}: {what} exceeds the limit of {policy.max_bytes} bytes")


async def _attempt(target: Target, addresses: list[str], policy: FetchPolicy,
                   sink: _FileSink, expected_sha256: str | None,
                   network_backend: httpcore.AsyncNetworkBackend | None,
                   ) -> tuple[int, str | None] | _Redirect:
    """GET one hop once: the body into `sink` (returns size and content type) or a redirect."""
    shown = target.shown
    transport = PinnedTransport(PinnedBackend(target.host, addresses, network_backend),
                                ssl_context(policy.ca_file))
    request = httpx.Request(
        "GET", target.url,
        # identity: the bytes stored are the bytes counted and hashed (no gzip bombs).
        headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
        extensions={"timeout": {"connect": policy.connect_timeout_s,
                                "read": policy.read_timeout_s,
                                "write": policy.read_timeout_s,
                                "pool": policy.connect_timeout_s}})
    try:
        response = await transport.handle_async_request(request)
        try:
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                                     f"{shown}: redirect {status} without a Location")
                return _Redirect(location)
            if status >= 500:
                raise _Transient(f"upstream answered {status}")
            if status != HTTPStatus.OK:
                code = await _error_code(response) if status >= 400 else ""
                reason = FetchError.NOT_FOUND if status == 404 else FetchError.UPSTREAM_ERROR
                raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, reason,
                                 f"{shown}: upstream answered {status}{code}")
            return await _receive(response, target, policy, sink, expected_sha256)
        finally:
            # A failure to hang up must not turn "too large" into a retried network error.
            with contextlib.suppress(httpx.TransportError, OSError):
                await response.aclose()
    except httpx.TransportError as exc:
        if _caused_by(exc, ssl.SSLCertVerificationError):  # no retry will fix a certificate
            raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                             f"{shown}: the server's TLS certificate is not valid for "
                             f"{target.host}") from None
        raise _describe_transport_error(exc, policy) from None
    finally:
        with contextlib.suppress(httpx.TransportError, httpcore.NetworkError, OSError):
            await transport.aclose()


async def _receive(response: httpx.Response, target: Target, policy: FetchPolicy,
                   sink: _FileSink, expected_sha256: str | None) -> tuple[int, str | None]:
    shown = target.shown
    declared = _declared_length(response, shown)
    if declared is not None and declared > policy.max_bytes:
        raise _too_large(shown, policy, f"Content-Length {declared}")
    checksums = _store_checksums(response.headers)
    if expected_sha256 is not None:
        checksums.insert(0, _Checksum("sha256", bytes.fromhex(expected_sha256), "expected_sha256"))
    await sink.reset(
        want_sha256=policy.hash_body or any(c.algorithm == "sha256" for c in checksums),
        want_md5=any(c.algorithm == "md5" for c in checksums))
    stream = response.extensions.get("network_stream")
    if (isinstance(stream, SocketStream) and stream.at_message_boundary
            and declared is not None and "transfer-encoding" not in response.headers):
        # The common case, an object store's GET: the body straight from the socket.
        with _httpx_errors():
            await stream.receive_body(declared, sink.write_now, timeout=policy.read_timeout_s)
        _verify(sink, checksums, shown)
        return declared, response.headers.get("content-type")
    if isinstance(stream, SocketStream):
        stream.end_of_headers()
    size = 0
    limit = policy.max_bytes
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:  # checked before the chunk is kept, whatever the headers said
            raise _too_large(shown, policy, "the body")
        await sink.write(chunk)
    await sink.finish()
    if declared is not None and size != declared:  # h11 enforces this; keep it explicit
        raise _Transient(f"body ended after {size} of {declared} bytes")
    _verify(sink, checksums, shown)
    return size, response.headers.get("content-type")


# --- hops, retries, the deadline ----------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the OS resolver gives for `host` (asyncio runs getaddrinfo in a thread)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _resolve(target: Target, policy: FetchPolicy, resolver: Resolver) -> list[str]:
    """Resolve a hop's host once and check every address; refuse if any one is refused."""
    if target.ip is not None:
        answers = [target.ip]
    else:
        try:
            answers = [str(a) for a in await resolver(target.host, target.port)]
        except socket.gaierror as exc:
            if exc.errno in _FINAL_DNS_ERRORS:
                raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                                 f"{target.shown}: host does not resolve") from None
            raise _Transient("host name resolution failed") from None
        except OSError:
            raise _Transient("host name resolution failed") from None
        if not answers:
            raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                             f"{target.shown}: host resolved to no address")
    for answer in answers:
        try:
            check_address(answer, policy)
        except FetchError as exc:
            raise refused(f"{target.shown}: {exc.message}") from None
    return list(dict.fromkeys(dial_address(a) for a in answers))


def _backoff_s(attempt: int, policy: FetchPolicy) -> float:
    step = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (attempt - 1))
    return step * random.uniform(1 - BACKOFF_JITTER, 1)


async def _hop(target: Target, policy: FetchPolicy, sink: _FileSink,
               expected_sha256: str | None, resolver: Resolver,
               network_backend: httpcore.AsyncNetworkBackend | None,
               end: float) -> tuple[int, str | None] | _Redirect:
    """One hop with retries; DNS is asked once (until it answers) and pinned for all tries."""
    addresses: list[str] | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            if addresses is None:
                addresses = await _resolve(target, policy, resolver)
            return await _attempt(target, addresses, policy, sink, expected_sha256,
                                  network_backend)
        except _Transient as exc:
            delay = _backoff_s(attempt, policy)
            if attempt == policy.max_attempts or time.monotonic() + delay >= end:
                raise exc.final(target.shown, attempt) from None
            logger.warning("fetch %s: %s; retrying in %.2f s (attempt %d of %d)",
                           target.shown, exc.detail, delay, attempt + 1, policy.max_attempts)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _follow(url: str, policy: FetchPolicy, sink: _FileSink, expected_sha256: str | None,
                  resolver: Resolver, network_backend: httpcore.AsyncNetworkBackend | None,
                  end: float) -> tuple[int, str | None]:
    """Follow redirects by hand, judging every hop by the same policy."""
    target = check_url(url, policy)
    visited = {str(target.url)}
    for redirects in range(policy.max_redirects + 1):
        outcome = await _hop(target, policy, sink, expected_sha256, resolver, network_backend,
                             end)
        if not isinstance(outcome, _Redirect):
            return outcome
        try:
            next_url = target.url.join(outcome.location)
        except (httpx.InvalidURL, ValueError):
            raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                             f"{target.shown}: redirect to an invalid URL") from None
        shown_next = redact_url(str(next_url))
        if str(next_url) in visited:
            raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                             f"{target.shown}: redirect loop (back to {shown_next})")
        if redirects == policy.max_redirects:
            break
        visited.add(str(next_url))
        logger.debug("fetch %s: redirected to %s", target.shown, shown_next)
        try:
            target = check_url(next_url, policy)
        except FetchError as exc:
            raise refused(f"redirect from {redact_url(url)}: {exc.message}") from None
    raise FetchError(HTTPStatus.UNPROCESSABLE_ENTITY, FetchError.UPSTREAM_ERROR,
                     f"{redact_url(url)}: more than {policy.max_redirects} redirects")


def _checked_sha256(expected_sha256: str | None) -> str | None:
    if expected_sha256 is None:
        return None
    if not _SHA256_HEX.fullmatch(expected_sha256.strip()):
        raise refused("expected_sha256 must be 64 hexadecimal digits")
    return expected_sha256.strip().lower()


async def fetch_to_file(url: str, policy: FetchPolicy, *, deadline: float | None = None,
                        expected_sha256: str | None = None, directory: Path | None = None,
                        resolver: Resolver | None = None,
                        network_backend: httpcore.AsyncNetworkBackend | None = None,
                        ) -> FetchedFile:
    """Download `url` into a new file in `directory` (default: the system temp directory).

    `deadline` is a time.monotonic() instant the whole fetch (DNS, redirects, retries,
    backoff) never outlives, on top of `policy.total_timeout_s`. `resolver` replaces the
    system resolver (host, port) -> addresses; `network_backend` is the httpcore backend
    that dials the pinned address (tests inject one to prove nothing was dialled). Raises
    FetchError; on any failure, cancellation included, no file is left behind.
    """
    shown = redact_url(url)
    expected = _checked_sha256(expected_sha256)
    started = time.monotonic()
    end = started + policy.total_timeout_s
    if deadline is not None:
        end = min(end, deadline)
    if end <= started:
        raise FetchError(HTTPStatus.GATEWAY_TIMEOUT, FetchError.TIMEOUT,
                         f"{shown}: the deadline has already passed")
    fd, name = tempfile.mkstemp(prefix=TEMP_FILE_PREFIX, dir=directory)
    path = Path(name)
    sink = _FileSink(fd)
    done = False
    try:
        budget = asyncio.timeout(end - time.monotonic())
        try:
            async with budget:
                size, content_type = await _follow(url, policy, sink, expected,
                                                   resolver or system_resolver,
                                                   network_backend, end)
        except TimeoutError:
            if not budget.expired():
                raise
            raise FetchError(HTTPStatus.GATEWAY_TIMEOUT, FetchError.TIMEOUT,
                             f"{shown}: not done after {time.monotonic() - started:.1f} s "
                             f"(total timeout {policy.total_timeout_s:g} s or the deadline)"
                             ) from None
        done = True
    except FetchError as exc:
        logger.warning("fetch failed: %s", exc.message)
        raise
    finally:

        def discard_if_failed() -> None:
            if not done:
                path.unlink(missing_ok=True)

        sink.close(then=discard_if_failed)
    elapsed = time.monotonic() - started
    logger.info("fetched %s: %d bytes in %.2f s (%.1f MB/s)", shown, size, elapsed,
                size / max(elapsed, 1e-9) / 1e6)
    digest = sink.sha256.hexdigest() if sink.sha256 is not None else None
    return FetchedFile(path=path, size=size, sha256=digest, content_type=content_type)
