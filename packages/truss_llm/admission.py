"""Admission control: at most N requests running or waiting, the rest refused at once.

vLLM 0.32 has the bound (`max_num_queued_reqs`, which we default to twice `max_num_seqs`),
but checks it before the request is counted: a burst that arrives together passes the
check all at once (seen here: 21 of 24 admitted against a bound of 4). So the model counts
its requests itself, before its first await, and vLLM's own check stays as a second line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import Counter

from truss_llm.errors import at_capacity

REJECTIONS = Counter("truss_llm_admission_rejections",
                     "Requests refused with a 429 because the model was at capacity.")


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> None:
        """Count a request in, or raise the 429 (RequestError) if the model is full."""
        if self.in_flight >= self.limit:
            REJECTIONS.inc()
            raise at_capacity()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def until_done(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream counts until it ends, however it ends."""
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self.leave()
