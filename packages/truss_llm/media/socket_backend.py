"""An httpcore network backend on blocking sockets, each call run on a worker thread.

Why not httpcore's own AnyIO backend: a large body that goes through asyncio, anyio, h11 and
httpcore is copied four times and handled 256 KiB at a time on the event loop. On a 2-core
machine that ran at under half of curl's speed, whatever the chunk size.

Here the HTTP exchange still goes through httpx, httpcore and h11 as usual: request, status
line, headers, redirects, chunked and close-delimited bodies. But a body with a
Content-Length can be taken by `SocketStream.receive_body` instead: one worker thread reads
it straight from the socket (or the TLS socket) into one of two reused buffers while a
second thread runs the caller's `consume` (the disk write, a hash) on the other one.

That is only correct if h11 holds none of the body when httpcore returns the response. The
stream sees to it: while reading headers, `read` hands over bytes only up to the end of a
header block (the blank line) and keeps what follows for the next read, so the body's first
bytes are still here. `at_message_boundary` says whether that holds.

Every call runs on this module's own thread pools, not the loop's default executor (which
the server may fill with blocking work). A cancelled call leaves its thread to finish: the
socket is shut down at once, which ends any blocked read, and closed once no thread uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import select
import socket
import ssl
import typing
from collections.abc import Callable, Iterable

import httpcore

T = typing.TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
HEADER_END = b"\r\n\r\n"
# Bytes asked of the socket per read while httpcore reads (headers, chunked bodies).
SOCKET_READ_BYTES = 256 * KiB
# Each of the two reused buffers of `receive_body`: filled by as many reads as it takes,
# then handed over whole. Large enough that the hand-over between threads is noise next to
# the copying; a fetch's memory is about twice this.
BODY_BUFFER_BYTES = 4 * MiB
# Fetches in flight at once, one thread each while its body streams; more wait their turn.
SOCKET_THREADS = 64


@functools.lru_cache(maxsize=1)
def _consume_executor() -> concurrent.futures.ThreadPoolExecutor:
    # Apart from `_executor`: a receive waits on its consume, so they must not share threads.
    return concurrent.futures.ThreadPoolExecutor(max_workers=SOCKET_THREADS,
                                                 thread_name_prefix="media-fetch-write")


@functools.lru_cache(maxsize=1)
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=SOCKET_THREADS,
                                                 thread_name_prefix="media-fetch-socket")


async def _on_thread(call: Callable[[], T], *, if_abandoned: Callable[[T], None] | None = None,
                     ) -> T:
    """Run `call` on the pool; if the caller is cancelled, `if_abandoned` gets its result."""
    work = _executor().submit(call)
    try:
        return await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        if if_abandoned is not None:

            def hand_over(done: concurrent.futures.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    if_abandoned(done.result())

            work.add_done_callback(hand_over)
        raise


@contextlib.contextmanager
def _mapped_errors(timeout: type[Exception], other: type[Exception]) -> typing.Iterator[None]:
    """socket and ssl errors as httpcore's, the vocabulary httpcore's callers expect."""
    try:
        yield
    except TimeoutError as exc:  # socket.timeout is TimeoutError since Python 3.10
        raise timeout(str(exc) or "timed out") from exc
    except OSError as exc:  # ssl.SSLError included
        raise other(str(exc) or type(exc).__name__) from exc


class SocketStream(httpcore.AsyncNetworkStream):
    """One connection: a blocking socket driven from worker threads, one call at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # Bytes received but not handed over yet: past a header block, or past what httpcore
        # asked for (a view, so that taking a piece does not copy the rest).
        self._pending = memoryview(b"")
        self._tail = b""  # the last bytes handed over, for a blank line split across reads
        self._reading_headers = True
        self._at_boundary = False
        self._in_flight: concurrent.futures.Future[typing.Any] | None = None
        self._closed = False

    # -- httpcore's interface --------------------------------------------------------------

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self._pending:
            self._pending = memoryview(await self._call(
                functools.partial(self._recv, max(max_bytes, SOCKET_READ_BYTES), timeout)))
        data, self._pending = bytes(self._pending[:max_bytes]), self._pending[max_bytes:]
        if self._reading_headers and data:
            data = self._through_header_end(data)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            await self._call(functools.partial(self._sendall, buffer, timeout))

    async def aclose(self) -> None:
        self._close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        if self._pending:
            raise httpcore.ConnectError("data arrived before the TLS handshake")

        def handshake() -> ssl.SSLSocket:
            with _mapped_errors(httpcore.ConnectTimeout, httpcore.ConnectError):
                self._sock.settimeout(timeout)
                return ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)

        try:
            tls_sock = await self._call(handshake)
        except BaseException:
            self._close()
            raise
        # The TLS socket owns the file descriptor now; this object is done with it.
        self._closed = True
        return SocketStream(tls_sock)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "socket":
            return self._sock
        if info == "ssl_object":  # httpcore asks it for the ALPN protocol
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "is_readable":  # a pooled connection the server has closed is readable
            return self._sock.fileno() != -1 and bool(select.select([self._sock], [], [], 0)[0])
        return None

    # -- the body, straight from the socket ---------------------------------------------------

    @property
    def at_message_boundary(self) -> bool:
        """True if what was handed to httpcore ended exactly at the end of a header block."""
        return self._reading_headers and self._at_boundary

    def end_of_headers(self) -> None:
        """Stop splitting reads at blank lines: httpcore reads the body itself."""
        self._reading_headers = False

    async def receive_body(self, length: int, consume: Callable[[memoryview], None],
                           timeout: float | None) -> None:
        """Read exactly `length` body bytes, giving them to `consume` on worker threads.

        `timeout` bounds each wait for data (the read gap). Raises httpcore.ReadTimeout,
        httpcore.ReadError, or httpcore.RemoteProtocolError if the connection ends early;
        an error of `consume` (a full disk) is raised as it is.
        If the caller is cancelled, the socket is shut down and this returns (raises) only
        once the thread has stopped calling `consume`, so the caller may close its file.
        """
        if not self.at_message_boundary:
            raise RuntimeError("httpcore may hold body bytes; read the body through it")
        self._reading_headers = False
        work = _executor().submit(self._receive_body, length, consume, timeout)
        self._in_flight = work
        done = asyncio.wrap_future(work)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self._shut_down()  # a blocked recv returns at once; at most one write remains
            # Wait it out even through another cancellation (this one is re-raised anyway):
            # returning earlier would let the caller close a file the thread still writes.
            while not done.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([done])
            if not done.cancelled():
                done.exception()  # retrieved: the failure is the cancellation's doing
            raise

    def _receive_body(self, length: int, consume: Callable[[memoryview], None],
                      timeout: float | None) -> None:
        remaining = length
        if self._pending:
            head, self._pending = self._pending[:remaining], memoryview(b"")
            consume(head)
            remaining -= len(head)
        # Two buffers: one is filled from the socket while `consume` works on the other, so
        # the disk write (and any hashing) runs on a second core beside the reads.
        size = min(BODY_BUFFER_BYTES, max(remaining, 1))
        buffers = (memoryview(bytearray(size)), memoryview(bytearray(size)))
        consuming: concurrent.futures.Future[None] | None = None
        try:
            for turn in itertools.cycle((0, 1)):
                if not remaining:
                    break
                buffer = buffers[turn]
                with _mapped_errors(httpcore.ReadTimeout, httpcore.ReadError):
                    self._sock.settimeout(timeout)
                    filled = self._fill(buffer[:min(size, remaining)], length - remaining)
                if consuming is not None:
                    consuming.result()  # the other buffer is free; `consume`'s error raised
                consuming = _consume_executor().submit(consume, buffer[:filled])
                remaining -= filled
            if consuming is not None:
                consuming.result()
        finally:
            # Never return while `consume` may still run: the caller then closes its file.
            if consuming is not None:
                concurrent.futures.wait([consuming])

    def _fill(self, buffer: memoryview, received_before: int) -> int:
        filled = 0
        while filled < len(buffer):
            received = self._sock.recv_into(buffer[filled:])
            if not received:
                raise httpcore.RemoteProtocolError(
                    f"connection closed after {received_before + filled} body bytes")
            filled += received
        return filled

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(self, call: Callable[[], T]) -> T:
        if self._closed:
            raise httpcore.ReadError("the connection is closed")
        work = _executor().submit(call)
        self._in_flight = work
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            self._close()  # httpcore closes a cancelled connection anyway; do it now
            raise

    def _recv(self, max_bytes: int, timeout: float | None) -> bytes:
        with _mapped_errors(httpcore.ReadTimeout, httpcore.ReadError):
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)

    def _sendall(self, buffer: bytes, timeout: float | None) -> None:
        with _mapped_errors(httpcore.WriteTimeout, httpcore.WriteError):
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)

    def _through_header_end(self, data: bytes) -> bytes:
        """The part of `data` through the first end of a header block; the rest waits."""
        window = self._tail + data
        end = window.find(HEADER_END)
        if end != -1:
            cut = end + len(HEADER_END) - len(self._tail)
            data, self._pending = data[:cut], memoryview(data[cut:] + self._pending)
        self._at_boundary = end != -1
        # A new block starts after a blank line: its own end must not borrow from this one.
        self._tail = b"" if self._at_boundary else window[-(len(HEADER_END) - 1):]
        return data

    def _shut_down(self) -> None:
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop
        # its TLS state under a thread that may still be reading.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shut_down()
        work = self._in_flight
        if work is None or work.done():
            self._sock.close()
        else:  # never close a descriptor a thread may still be using
            work.add_done_callback(lambda _: self._sock.close())


class SocketBackend(httpcore.AsyncNetworkBackend):
    """Dials with socket.create_connection on a worker thread; streams are SocketStreams."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        options = list(socket_options or ())

        def connect() -> socket.socket:
            with _mapped_errors(httpcore.ConnectTimeout, httpcore.ConnectError):
                sock = socket.create_connection(
                    (host, port), timeout,
                    source_address=None if local_address is None else (local_address, 0))
                try:
                    for option in options:
                        sock.setsockopt(*option)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    sock.close()
                    raise
                return sock

        return SocketStream(await _on_thread(connect, if_abandoned=socket.socket.close))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
