"""Read a request body under a byte limit, without holding an oversized one in memory.

Baseten's edge answers 413 for a body over 100 MB before it reaches the model. We count
bytes as they arrive and trust no Content-Length: a declared size over the limit is refused
at once, a body that grows past it is refused as soon as it does. Bodies are spooled to a
temporary file past a small size, so a refused one never sits in memory, and the rest of an
oversized body is read and thrown away, so that the client, still sending, reads a clean
413 instead of a reset connection.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from truss_llm.cancellation import ClientDisconnected

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

# Past this many bytes we stop draining an oversized body and let the connection drop.
DRAIN_LIMIT_BYTES = 2 * 1024**3
# Bodies up to this size stay in memory (every chat request); larger ones go to disk.
IN_MEMORY_BYTES = 1024 * 1024


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the {limit:,} byte limit. Upload large inputs "
                         "to object storage and send a pre-signed URL instead.")


def declared_length(scope: Message) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, already: int) -> None:
    total = already
    while total < DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class Body:
    """A request body read in full: in memory when small, in a temporary file when not."""

    def __init__(self) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BYTES)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._spool.write(chunk)
        self.size += len(chunk)

    def read(self) -> bytes:
        self.rewind()
        return self._spool.read()

    def rewind(self) -> None:
        self._spool.seek(0)

    async def read_off_loop(self) -> bytes:
        """The whole body; one on disk is read in a worker thread (the read releases the
        GIL, so the streams of the replica go on meanwhile)."""
        if self.size <= IN_MEMORY_BYTES:
            return self.read()
        return await asyncio.to_thread(self.read)

    def close(self) -> None:
        self._spool.close()


async def read_body(scope: Message, receive: Receive, limit: int) -> Body:
    """The whole body, or BodyTooLarge once it is known to exceed `limit` bytes."""
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        await _drain(receive, 0)
        raise BodyTooLarge(limit)
    body = Body()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            body.close()
            raise ClientDisconnected()  # while still sending the body
        chunk = message.get("body", b"")
        if body.size + len(chunk) > limit:
            body.close()
            if message.get("more_body", False):
                await _drain(receive, body.size + len(chunk))
            raise BodyTooLarge(limit)
        body.write(chunk)
        if not message.get("more_body", False):
            body.rewind()
            return body


def replaying(body: Body, receive: Receive) -> Receive:
    """A `receive` that yields the body already read, then the client's own messages
    (so the app downstream still learns of a disconnect).

    The body goes in one message, read from the spool in a worker thread, not in pieces
    read on the event loop. (Starlette's `request.body()` still copies it once on the loop:
    it joins what it receives with a closing empty piece.)"""
    done = False

    async def receive_again() -> Message:
        nonlocal done
        if done:
            return await receive()
        done = True
        whole = await body.read_off_loop()
        body.close()
        return {"type": "http.request", "body": whole, "more_body": False}

    return receive_again
