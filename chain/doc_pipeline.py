"""The run, as the entrypoint drives it: budget, split, map, reduce, result.

Plain functions over the three chainlets (their deployed stubs, or the local instances
under `run_local`), so the streaming entrypoint runs the same steps.

The budget: Baseten ends a sync predict at 1200 s and an async one at 3600 s. A chainlet
cannot see which route called it (truss hands `run_remote` only the parsed input, and
Baseten documents no header that marks an async request), so the caller says so with
`options.invocation` ("sync" by default); `options.deadline_s` can only shorten it. The run
aims to finish a margin before that, keeps a share of the time left after the split for
the reduce, and hands every chainlet the same wall-clock deadline, which each enforces
itself by cancelling its model calls.
"""

import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from doc_config import (
    ASYNC_BUDGET_S,
    DEADLINE_MARGIN_FRACTION,
    DEADLINE_MARGIN_S,
    REDUCE_RESERVE_FRACTION,
    SYNC_BUDGET_S,
)
from doc_llm import DEADLINE
from doc_schemas import (
    CallOptions,
    ChainError,
    ChainRequest,
    ChainResult,
    MapRequest,
    MapResult,
    MissingChunk,
    ReduceRequest,
    ReduceResult,
    SplitRequest,
    SplitResult,
    Timings,
    Usage,
)


class ChainFailure(Exception):
    """The run cannot give an answer; `status` is the HTTP status the caller gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message

    @classmethod
    def of(cls, error: ChainError) -> "ChainFailure":
        return cls(error.status, error.message)


class SplitStep(Protocol):
    async def run_remote(self, request: SplitRequest) -> SplitResult: ...


class MapStep(Protocol):
    async def run_remote(self, request: MapRequest) -> MapResult: ...


class ReduceStep(Protocol):
    async def run_remote(self, request: ReduceRequest) -> ReduceResult: ...


def run_budget_s(request: ChainRequest) -> float:
    """Seconds the whole run may take: the route's limit (or less), minus a margin."""
    limit = ASYNC_BUDGET_S if request.options.invocation == "async" else SYNC_BUDGET_S
    budget = min(limit, request.options.deadline_s or limit)
    return budget - min(DEADLINE_MARGIN_S, budget * DEADLINE_MARGIN_FRACTION)


@dataclass
class Mapped:
    """What the map produced, before the reduce."""

    split: SplitResult
    mapped: MapResult
    call: CallOptions
    started: float  # time.monotonic() at the start of the run
    deadline_unix: float
    timings: Timings

    @property
    def partials(self) -> list[str]:
        return [r.text for r in self.mapped.results if r.text is not None]

    @property
    def missing(self) -> list[MissingChunk]:
        return [MissingChunk(index=r.index, reason=r.error or "no answer")
                for r in self.mapped.results if r.text is None]


async def split_and_map(splitter: SplitStep, mapper: MapStep, request: ChainRequest
                        ) -> Mapped:
    """Split and map, or raise ChainFailure (4xx for the input, 5xx for the model)."""
    started = time.monotonic()
    deadline_unix = time.time() + run_budget_s(request)
    options = request.options
    split = await splitter.run_remote(SplitRequest(
        document_url=request.document_url, text=request.text, question=request.question,
        chunk_tokens=options.chunk_tokens, max_output_tokens=options.max_output_tokens,
        deadline_unix=deadline_unix))
    if split.error is not None:
        raise ChainFailure.of(split.error)
    call = CallOptions(question=request.question, max_output_tokens=split.max_output_tokens,
                       temperature=options.temperature, max_attempts=options.max_attempts)
    # The reduce keeps a share of what is left; the map gets the rest.
    map_deadline = deadline_unix - (deadline_unix - time.time()) * REDUCE_RESERVE_FRACTION
    map_started = time.monotonic()
    mapped = await mapper.run_remote(MapRequest(
        chunks=split.chunks, total_chunks=len(split.chunks), concurrency=options.map_concurrency,
        call=call, deadline_unix=map_deadline))
    timings = Timings(fetch_s=split.fetch_s, split_s=split.split_s,
                      map_s=time.monotonic() - map_started)
    result = Mapped(split, mapped, call, started, deadline_unix, timings)
    missing = result.missing
    if missing and (options.failure_policy == "fail" or not result.partials):
        deadline_hit = any(m.reason == DEADLINE for m in missing)
        status = HTTPStatus.GATEWAY_TIMEOUT if deadline_hit else HTTPStatus.BAD_GATEWAY
        shown = ", ".join(f"{m.index} ({m.reason})" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ChainFailure(status, f"{len(missing)} of {len(split.chunks)} chunks have no "
                                   f"answer: {shown}{more}")
    return result


def reduce_request(mapped: Mapped, concurrency: int, stop_before_final: bool = False
                   ) -> ReduceRequest:
    return ReduceRequest(partials=mapped.partials, budget_tokens=mapped.split.reduce_budget_tokens,
                         call=mapped.call, deadline_unix=mapped.deadline_unix,
                         concurrency=concurrency, stop_before_final=stop_before_final)


async def run_chain(splitter: SplitStep, mapper: MapStep, reducer: ReduceStep,
                    request: ChainRequest) -> ChainResult:
    mapped = await split_and_map(splitter, mapper, request)
    reduce_started = time.monotonic()
    reduced = await reducer.run_remote(reduce_request(mapped, request.options.map_concurrency))
    if reduced.error is not None:
        raise ChainFailure.of(reduced.error)
    timings = mapped.timings
    timings.reduce_s = time.monotonic() - reduce_started
    timings.total_s = time.monotonic() - mapped.started
    usage = Usage(map_calls=mapped.mapped.usage.model_calls,
                  reduce_calls=reduced.usage.model_calls)
    usage.add(mapped.mapped.usage)
    usage.add(reduced.usage)
    return ChainResult(
        answer=reduced.answer or "", partial_results=mapped.partials,
        missing_chunks=mapped.missing, chunks=len(mapped.split.chunks),
        document_bytes=mapped.split.document_bytes,
        document_tokens=mapped.split.document_tokens, reduce_levels=reduced.levels,
        usage=usage, timings=timings)
