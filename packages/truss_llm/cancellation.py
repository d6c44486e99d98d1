"""Abort engine work that nobody is waiting for any more.

The truss server checks for a disconnected client only before it calls the model. A
streamed response is cancelled by Starlette when the client goes away (vLLM then aborts the
request), but a non-streaming completion would keep the engine busy until its last token.
So the handler races the request against the client's `http.disconnect`, as vLLM's own
`@with_cancellation` does, and cancelling the handler aborts the engine request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has already been read by the server, so the next ASGI message is the
    # disconnect (or nothing, until the response is sent).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        handler.cancel()  # we are being cancelled ourselves: take the engine work with us
        raise
    finally:
        watcher.cancel()
    if handler.done():
        return handler.result()
    handler.cancel()
    try:
        await handler
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()
