"""How many bytes of media a request, and the whole replica, may hold in memory at once.

A fetched part goes to a temporary file first (disk, bounded by the part's modality cap);
it enters memory when it is read and base64-encoded for vLLM, and stays there, as a data
URL, then as decoded pixels or samples, until the request ends. So the bytes of every media
part, fetched or inlined, are counted twice:

- against the request's own cap (`max_request_media_bytes`): past it the request is refused
  with a 413 that says which part crossed it (final: the same request never fits);
- against the replica's budget (`replica_media_budget_bytes`), from the moment they enter
  memory until the response is complete (for a stream: its last chunk): past it the request
  is refused with a 429 and Retry-After, since other requests will release theirs soon.

Bytes here are media bytes, not RAM: the process holds a small multiple of them while a
part is encoded and decoded (see the README's security section for the measured bound).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from truss_llm.errors import RequestError

MEDIA_BUSY_RETRY_AFTER_S = 2  # a request's media live about as long as one generation


class MediaBudget:
    """The replica-wide count of media bytes in memory; thread-safe, never blocks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_take(self, size: int) -> bool:
        with self._lock:
            if self._in_use + size > self.limit:
                return False
            self._in_use += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._in_use = max(0, self._in_use - size)


class MediaLease:
    """One request's media bytes: checked against its cap, held against the replica's budget
    until `release()` (directly, or by `hold(result)` once the response is done)."""

    def __init__(self, budget: MediaBudget, request_cap: int) -> None:
        self._budget = budget
        self.request_cap = request_cap
        self.counted = 0  # bytes of every part of the request so far
        self.held = 0  # of those, bytes taken from the replica's budget
        self._released = False

    def take(self, size: int, where: str) -> None:
        """Count `size` bytes of the part at `where`; raise 413 or 429 if they do not fit."""
        self.counted += size
        if self.counted > self.request_cap:
            raise RequestError(
                f"{where}: the request's media add up to more than {self.request_cap:,} bytes "
                f"(at least {self.counted:,}), the limit per request "
                "(max_request_media_bytes). Send fewer or smaller parts.",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param=where)
        if self._released or not self._budget.try_take(size):
            raise RequestError(
                f"{where}: the replica is holding as many media bytes as it may "
                f"({self._budget.limit:,}, replica_media_budget_bytes); retry shortly.",
                HTTPStatus.TOO_MANY_REQUESTS, param=where,
                retry_after_s=MEDIA_BUSY_RETRY_AFTER_S)
        self.held += size

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget.give_back(self.held)
            self.held = 0

    def hold(self, result: Any) -> Any:
        """`result` as the response to send: released now for a complete response, at the
        end (or close) of the stream for an async iterator."""
        if not hasattr(result, "__anext__") or self.held == 0:
            self.release()
            return result
        return self._until_done(result)

    async def _until_done(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for item in stream:
                yield item
        finally:
            self.release()
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
