"""SocketStream on one end of a socket pair: no network, the other end played by the test.

What httpcore reads must end at a header block's blank line so that the body's first bytes
stay with the stream, however the bytes arrive; `receive_body` must hand over exactly the
declared bytes, fail clearly when the peer stops early or goes quiet, and, when cancelled,
return only once its thread has stopped writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpcore
import pytest
from truss_llm.media import socket_backend
from truss_llm.media.socket_backend import SocketBackend, SocketStream

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[SocketStream, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield SocketStream(ours), theirs
    theirs.close()
    ours.close()


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def collect() -> tuple[list[bytes], object]:
    pieces: list[bytes] = []
    return pieces, lambda view: pieces.append(bytes(view))


def test_headers_and_body_in_one_segment(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD + b"hello")
    pieces, consume = collect()

    async def scenario() -> bytes:
        head = await stream.read(65536, timeout=5)
        assert stream.at_message_boundary
        await stream.receive_body(5, consume, timeout=5)  # type: ignore[arg-type]
        return head

    assert run(scenario()) == HEAD
    assert b"".join(pieces) == b"hello"


def test_blank_line_split_across_reads(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    pieces, consume = collect()

    async def scenario() -> list[bytes]:
        peer.sendall(HEAD[:-1])  # ends in "\r\n\r"
        first = await stream.read(65536, timeout=5)
        assert not stream.at_message_boundary
        peer.sendall(b"\nhello")
        second = await stream.read(65536, timeout=5)
        assert stream.at_message_boundary
        await stream.receive_body(5, consume, timeout=5)  # type: ignore[arg-type]
        return [first, second]

    assert run(scenario()) == [HEAD[:-1], b"\n"]
    assert b"".join(pieces) == b"hello"


def test_each_header_block_is_handed_over_alone(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    peer.sendall(interim + HEAD + b"hello")

    async def scenario() -> list[bytes]:
        reads = [await stream.read(65536, timeout=5), await stream.read(65536, timeout=5)]
        stream.end_of_headers()  # from here httpcore would read the body itself
        reads.append(await stream.read(65536, timeout=5))
        return reads

    assert run(scenario()) == [interim, HEAD, b"hello"]


def test_small_reads_are_honoured(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD + b"hello")

    async def scenario() -> bytes:
        parts = [await stream.read(7, timeout=5) for _ in range(6)]
        assert all(len(part) <= 7 for part in parts)
        return b"".join(parts)

    assert run(scenario()) == HEAD  # then it stops at the blank line


def test_body_refused_unless_at_a_boundary(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD[:10])

    async def scenario() -> None:
        await stream.read(65536, timeout=5)
        await stream.receive_body(5, lambda view: None, timeout=5)

    with pytest.raises(RuntimeError, match="httpcore may hold body bytes"):
        run(scenario())


def test_body_larger_than_the_buffers(pair: tuple[SocketStream, socket.socket],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket_backend, "BODY_BUFFER_BYTES", 4096)
    stream, peer = pair
    body = bytes(range(256)) * 1000  # 256,000 bytes: 63 buffers and a part
    pieces, consume = collect()

    async def scenario() -> None:
        peer.sendall(HEAD)
        await stream.read(65536, timeout=5)
        sender.start()
        await stream.receive_body(len(body), consume, timeout=5)  # type: ignore[arg-type]

    sender = threading.Thread(target=peer.sendall, args=(body + b"trailing junk",))

    run(scenario())
    sender.join(timeout=5)
    assert b"".join(pieces) == body
    assert max(len(piece) for piece in pieces) <= 4096


def test_peer_closing_early_is_a_protocol_error(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD + b"he")
    peer.shutdown(socket.SHUT_WR)

    async def scenario() -> None:
        await stream.read(65536, timeout=5)
        await stream.receive_body(5, lambda view: None, timeout=5)

    with pytest.raises(httpcore.RemoteProtocolError, match="after 2 body bytes"):
        run(scenario())


def test_silence_is_a_read_timeout(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD + b"he")

    async def scenario() -> None:
        await stream.read(65536, timeout=5)
        await stream.receive_body(5, lambda view: None, timeout=0.2)

    started = time.monotonic()
    with pytest.raises(httpcore.ReadTimeout):
        run(scenario())
    assert time.monotonic() - started < 2


def test_a_failing_consume_ends_the_receive(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD)

    def disk_full(view: memoryview) -> None:
        raise OSError(28, "No space left on device")

    async def scenario() -> None:
        await stream.read(65536, timeout=5)
        peer.sendall(b"hello")
        await stream.receive_body(5, disk_full, timeout=5)

    with pytest.raises(OSError, match="No space left"):  # a local fault: not retried
        run(scenario())


@pytest.mark.timeout(10)
def test_cancelled_receive_stops_its_thread_before_returning(
        pair: tuple[SocketStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(HEAD + b"he")  # then silence, far shorter than the read timeout
    calls_after_return: list[int] = []
    returned = threading.Event()

    def consume(view: memoryview) -> None:
        if returned.is_set():
            calls_after_return.append(len(view))

    async def scenario() -> float:
        await stream.read(65536, timeout=5)
        task = asyncio.create_task(stream.receive_body(5, consume, timeout=30))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        returned.set()
        return time.monotonic() - started

    assert run(scenario()) < 1
    with contextlib.suppress(OSError):  # the stream has shut the connection down
        peer.sendall(b"llo")
    time.sleep(0.1)
    assert calls_after_return == []


@pytest.mark.timeout(10)
def test_closing_ends_a_blocked_read(pair: tuple[SocketStream, socket.socket]) -> None:
    stream, _ = pair

    async def scenario() -> float:
        reading = asyncio.create_task(stream.read(65536, timeout=30))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await stream.aclose()
        return time.monotonic() - started

    assert run(scenario()) < 1
    with pytest.raises(httpcore.ReadError):
        run(stream.read(10, timeout=1))


def test_connect_to_a_closed_port_is_a_connect_error() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpcore.ConnectError):
        run(SocketBackend().connect_tcp("127.0.0.1", port, timeout=2))


@pytest.mark.timeout(10)
def test_a_second_cancellation_still_waits_for_the_write_in_flight(
        pair: tuple[SocketStream, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket_backend, "BODY_BUFFER_BYTES", 4096)
    stream, peer = pair
    writing = threading.Event()
    finished: list[float] = []

    def slow_disk(view: memoryview) -> None:
        writing.set()
        time.sleep(0.5)
        finished.append(time.monotonic())

    async def scenario() -> float:
        peer.sendall(HEAD)
        await stream.read(65536, timeout=5)
        task = asyncio.create_task(stream.receive_body(10 * 4096, slow_disk, timeout=30))
        peer.sendall(bytes(4096))  # one buffer: its write starts and takes 0.5 s
        await asyncio.get_running_loop().run_in_executor(None, writing.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # impatient: cancelled again while the first one is handled
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    returned = run(scenario())
    assert len(finished) == 1 and returned >= finished[0]
