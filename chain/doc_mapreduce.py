"""The map step (one model call per chunk) and the reduce step (merge until one is left).

Both run under a deadline handed over as a wall-clock instant (chainlets are separate
processes, so their monotonic clocks do not compare), turned into this process's
monotonic clock on arrival.
"""

from http import HTTPStatus

import httpx
from doc_llm import DEADLINE, CallFailed, ChatEndpoint, chat, monotonic_deadline, run_bounded
from doc_prompts import TOKENS_PER_PARTIAL, TokenCounter, map_messages, reduce_messages
from doc_schemas import (
    ChainError,
    ChunkResult,
    MapRequest,
    MapResult,
    ReduceRequest,
    ReduceResult,
    Usage,
)


async def map_chunks(client: httpx.AsyncClient, endpoint: ChatEndpoint, request: MapRequest
                     ) -> MapResult:
    """Every chunk once, `request.concurrency` at a time, in document order in the result.

    A chunk whose call still fails after its retries, or that the deadline stops, gets an
    `error` instead of `text`; the others are unaffected.
    """
    deadline = monotonic_deadline(request.deadline_unix)
    results = [ChunkResult(index=request.first_index + i, error=DEADLINE)
               for i in range(len(request.chunks))]
    usage = Usage()

    async def map_one(i: int) -> None:
        number = request.first_index + i + 1
        messages = map_messages(request.chunks[i], number, request.total_chunks,
                                request.call.question)
        try:
            answer = await chat(client, endpoint, messages, request.call, deadline)
        except CallFailed as failed:
            results[i] = ChunkResult(index=results[i].index, attempts=failed.attempts,
                                     error=failed.reason)
            usage.add(Usage(model_calls=failed.attempts, retries=max(0, failed.attempts - 1)))
            return
        results[i] = ChunkResult(index=results[i].index, attempts=answer.attempts,
                                 text=answer.text)
        usage.add(answer.usage)

    await run_bounded(len(request.chunks), request.concurrency, deadline, map_one)
    return MapResult(results=results, usage=usage)


def _groups(counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive partials, as many per reduce call as fit `budget` tokens."""
    groups: list[list[int]] = []
    used = 0
    for index, count in enumerate(counts):
        cost = count + TOKENS_PER_PARTIAL
        if groups and used + cost <= budget:
            groups[-1].append(index)
            used += cost
        else:
            groups.append([index])
            used = cost
    return groups


async def reduce_partials(client: httpx.AsyncClient, endpoint: ChatEndpoint,
                          counter: TokenCounter, request: ReduceRequest) -> ReduceResult:
    """Merge level by level, the calls of a level side by side, until one answer is left.

    `levels` lists how many texts entered each level, ending with 1: its length minus one
    is the depth of the reduce tree. With `stop_before_final`, the last call is not made:
    its messages are returned for the caller to stream.
    """
    deadline = monotonic_deadline(request.deadline_unix)
    current = list(request.partials)
    levels = [len(current)]
    usage = Usage()
    while len(current) > 1:
        groups = _groups(counter.count(current), request.budget_tokens)
        if len(groups) == len(current):
            return ReduceResult(levels=levels, usage=usage, error=ChainError(
                status=HTTPStatus.INTERNAL_SERVER_ERROR,
                message="partial answers too long to merge two per call"))
        if len(groups) == 1 and request.stop_before_final:
            return ReduceResult(levels=levels, usage=usage,
                                final_messages=reduce_messages(current,
                                                               request.call.question))
        merged: list[str | None] = [None] * len(groups)
        failures: list[CallFailed] = []

        async def merge(g: int, texts: list[str], slot: list[str | None] = merged,
                        failed: list[CallFailed] = failures) -> None:
            if len(texts) == 1:  # nothing to merge it with at this level: it moves up
                slot[g] = texts[0]
                return
            try:
                answer = await chat(client, endpoint,
                                    reduce_messages(texts, request.call.question),
                                    request.call, deadline)
            except CallFailed as exc:
                usage.add(Usage(model_calls=exc.attempts, retries=max(0, exc.attempts - 1)))
                failed.append(exc)
                return
            usage.add(answer.usage)
            slot[g] = answer.text

        finished = await run_bounded(
            len(groups), request.concurrency, deadline,
            lambda g, groups=groups, texts=current: merge(g, [texts[i] for i in groups[g]]))
        if not finished or any(f.reason == DEADLINE for f in failures):
            return ReduceResult(levels=levels, usage=usage, error=ChainError(
                status=HTTPStatus.GATEWAY_TIMEOUT,
                message=f"the deadline passed during reduce level {len(levels)}"))
        if failures:
            return ReduceResult(levels=levels, usage=usage, error=ChainError(
                status=HTTPStatus.BAD_GATEWAY,
                message=f"a reduce call failed after {failures[0].attempts} attempts: "
                        f"{failures[0].reason}"))
        current = [text or "" for text in merged]
        levels.append(len(current))
    return ReduceResult(answer=current[0] if current else "", levels=levels, usage=usage)
