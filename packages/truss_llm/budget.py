"""The 20-minute budget: every request gets a deadline, and its answer leaves before it.

Baseten ends a sync request at 1200 s with a 504, and the client gets nothing for the GPU
time spent. So each request gets a deadline when it reaches the model: the sync budget
(1200 s) or the async attempt budget (3600 s), less a margin for the answer to leave. Media
fetching, waiting in the engine's queue and generating all count against it. When time
runs out the engine request is aborted and the answer is sent as it stands: complete and
well formed, `finish_reason: "length"`, and marked (`MARKER_FIELD` in the body, and in the
last chunk of a stream; `MARKER_HEADER` on a non-streaming answer).

Which budget applies: Baseten's docs and truss's server (0.18.36: it reads only
`x-baseten-request-id` and `x-baseten-chain-request-id`) give the model no sign of whether a
request came through `/predict` or `/async_predict`. So a deployment's requests get
`default_kind` (sync unless configured), the local runner says which with
`KIND_HEADER`, and any client can shorten (never lengthen) its own budget with
`BUDGET_HEADER`, or ask to be refused rather than truncated with `POLICY_HEADER`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from truss_llm.env_settings import prefixed_values
from truss_llm.errors import RequestError
from truss_llm.limits import ASYNC_RUN_TIMEOUT_S, SYNC_TIMEOUT_S

ENV_PREFIX = "TRUSS_LLM_BUDGET_"

# Request headers (lower case, as ASGI and Starlette give them).
KIND_HEADER = "x-truss-llm-request-kind"      # "sync" | "async"
BUDGET_HEADER = "x-truss-llm-budget-s"        # seconds; only ever shortens the budget
POLICY_HEADER = "x-truss-llm-budget-policy"   # "truncate" | "reject"
# The marker of an answer the budget ended.
MARKER_HEADER = "X-Truss-LLM-Truncated-By-Budget"
MARKER_FIELD = "truncated_by_budget"
# On any answer whose max_tokens the `truncate` policy lowered before it started: the new one.
CLAMPED_HEADER = "X-Truss-LLM-Max-Tokens-Clamped"

# The margin is at most this share of a (short) budget, so a 5 s budget still generates.
MAX_MARGIN_FRACTION = 0.25
# vLLM's final usage chunk of a stream is the only one with no choices.
_USAGE_CHUNK = '"choices":[]'
_FINISH = '"finish_reason":"'
_SSE_DATA = "data: "

Kind = Literal["sync", "async"]
Policy = Literal["truncate", "reject"]


class BudgetSettings(BaseModel):
    """`model_metadata.budget` of config.yaml, then `TRUSS_LLM_BUDGET_<FIELD>` variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sync_s: float = Field(default=SYNC_TIMEOUT_S, gt=0, description="sync predict budget")
    async_s: float = Field(default=ASYNC_RUN_TIMEOUT_S, gt=0,
                           description="one async attempt's budget")
    margin_s: float = Field(default=10.0, ge=0,
                            description="time kept for the answer to leave the replica")
    policy: Policy = Field(default="truncate", description=(
        "a request that cannot finish in time at the measured speed: clamp its length "
        "(truncate) or refuse it at once with a 400 (reject)"))
    default_kind: Kind = Field(default="sync", description=(
        "the budget of a request that does not say (set async for an async-only deployment)"))

    def seconds(self, kind: Kind) -> float:
        return self.sync_s if kind == "sync" else self.async_s


def budget_settings(config: Mapping[str, Any], environ: Mapping[str, str] | None = None
                    ) -> BudgetSettings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = dict((config.get("model_metadata") or {}).get("budget") or {})
    values.update(prefixed_values(environ, ENV_PREFIX, BudgetSettings.model_fields, "budget"))
    return BudgetSettings.model_validate(values)


@dataclass
class Deadline:
    """One request's deadline, on the `time.monotonic` clock."""

    at: float
    budget_s: float
    kind: Kind
    policy: Policy
    clamped_to: int | None = None  # max_tokens lowered to this, to fit, before it started
    expired: bool = False     # the deadline passed while the engine was working on it
    truncated: bool = False   # the answer was cut short by the budget (the marker's meaning)

    def remaining(self) -> float:
        return self.at - time.monotonic()


def _header_choice(headers: Mapping[str, str], name: str, choices: tuple[str, ...]
                   ) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip().lower()
    if value not in choices:
        raise RequestError(f"Header {name}: {value!r} is not one of {', '.join(choices)}.")
    return value


def deadline_for(headers: Mapping[str, str], settings: BudgetSettings,
                 arrived: float | None = None) -> Deadline:
    """The deadline of a request that arrived at `arrived` (monotonic), from its headers."""
    arrived = time.monotonic() if arrived is None else arrived
    kind = _header_choice(headers, KIND_HEADER, ("sync", "async")) or settings.default_kind
    policy = _header_choice(headers, POLICY_HEADER, ("truncate", "reject")) or settings.policy
    budget = settings.seconds(kind)  # type: ignore[arg-type]
    asked = headers.get(BUDGET_HEADER)
    if asked is not None:
        try:
            seconds = float(asked)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:  # also refuses NaN
            raise RequestError(f"Header {BUDGET_HEADER}: {asked!r} is not a positive number "
                               "of seconds.")
        budget = min(budget, seconds)
    margin = min(settings.margin_s, budget * MAX_MARGIN_FRACTION)
    return Deadline(at=arrived + budget - margin, budget_s=budget, kind=kind,  # type: ignore[arg-type]
                    policy=policy)  # type: ignore[arg-type]


# The deadline of the request being served. Set by the OpenAI surface before it calls
# vLLM's serving classes; read by the engine wrapper when they start a generation (that
# call happens in the request's own task, so the context carries it there).
_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "truss_llm_deadline", default=None)


def current() -> Deadline | None:
    return _CURRENT.get()


def enter(deadline: Deadline) -> contextvars.Token:
    return _CURRENT.set(deadline)


def leave(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


class BudgetRejected(RequestError):
    """The `reject` policy: the request cannot finish in time at the measured speed."""


def mark_body(body: dict[str, Any], deadline: Deadline | None) -> dict[str, Any]:
    if deadline is not None and deadline.truncated:
        body[MARKER_FIELD] = True
    return body


def response_headers(deadline: Deadline | None, body: dict[str, Any] | None = None
                     ) -> dict[str, str]:
    """The budget's headers: the clamp (known before a stream starts), and for a whole
    answer whether the budget ended it."""
    headers = {}
    if deadline is not None and deadline.clamped_to is not None:
        headers[CLAMPED_HEADER] = str(deadline.clamped_to)
    if body is not None and MARKER_FIELD in body:
        headers[MARKER_HEADER] = "true"
    return headers


async def finish_stream(stream: AsyncIterator[str], deadline: Deadline,
                        usage_requested: bool, choices: int) -> AsyncIterator[str]:
    """Pass vLLM's SSE chunks through; put the marker on the final usage chunk of a stream
    the budget ended.

    The surface always asks vLLM for that usage chunk, so a truncated stream ends with a
    chunk carrying the marker and the usage, then `[DONE]`; for a client that did not ask
    for usage, the chunk is dropped again when the stream ended on its own. A generation
    aborted before its first token gets no finishing chunk from vLLM: we add it.
    """
    finished = False
    async for chunk in stream:
        finished = finished or _FINISH in chunk
        if _USAGE_CHUNK in chunk and chunk.startswith(_SSE_DATA + "{"):
            if deadline.truncated:
                usage = json.loads(chunk[len(_SSE_DATA):])
                if not finished:
                    yield _finish_chunk(usage, choices)
                usage[MARKER_FIELD] = True
                chunk = f"{_SSE_DATA}{json.dumps(usage, separators=(',', ':'))}\n\n"
            elif not usage_requested:
                continue
        yield chunk


def _finish_chunk(usage_chunk: dict[str, Any], choices: int) -> str:
    """A chunk that ends every choice with `length`, in the shape of the stream's own."""
    chat = usage_chunk.get("object") == "chat.completion.chunk"
    ends = [{"index": index, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
             "finish_reason": "length"} for index in range(choices)]
    chunk = {key: usage_chunk[key] for key in ("id", "object", "created", "model")
             if key in usage_chunk}
    return f"{_SSE_DATA}{json.dumps({**chunk, 'choices': ends})}\n\n"


async def mark_final_event(stream: AsyncIterator[str], deadline: Deadline,
                           final_events: frozenset[str]) -> AsyncIterator[str]:
    """For the Responses and Anthropic streams (named SSE events): put the marker in the
    event that ends the answer when the budget ended it; every other event passes as is."""
    async for chunk in stream:
        if deadline.truncated and chunk.startswith("event: "):
            name, _, data = chunk.partition("\n")
            if name[len("event: "):].strip() in final_events and data.startswith(_SSE_DATA):
                event = json.loads(data[len(_SSE_DATA):])
                event[MARKER_FIELD] = True
                chunk = f"{name}\n{_SSE_DATA}{json.dumps(event, separators=(',', ':'))}\n\n"
        yield chunk


async def within(stream: AsyncIterator[str], deadline: Deadline) -> AsyncIterator[str]:
    """Iterate `stream` with `deadline` as the current one. vLLM's Responses stream starts
    its generation on its first iteration, in the task that sends the response, where the
    request's context (and so its deadline) is no longer set."""
    token = enter(deadline)
    try:
        async for chunk in stream:
            yield chunk
    finally:
        with contextlib.suppress(ValueError):  # closed from another context: nothing to undo
            leave(token)
