"""Calls to the chat model over its OpenAI API: the endpoint, retries, map and reduce.

Where the endpoint comes from:
- deployed with the chain (the default): the `TrussHandle` chains injects for the
  `ChatModel` TrussChainlet gives URL and headers (`http_call_args(sync_path=...)`);
- an existing deployment: its OpenAI base URL and the chain's Baseten API key;
- locally: the runner's URL (`LocalModel`, a handle with the same call).

The calls are plain httpx, not `StubBase.predict_async`: that retries every exception, a
400 included, and turns an OpenAI error body into a ValueError without its status; here a
429, a 5xx, a 408 or a timeout is retried with backoff inside the run's deadline and any
other 4xx is final at once.
"""

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import httpx
from doc_prompts import Messages
from doc_schemas import CallOptions, Usage

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# Longest wait for one answer before it counts as a timeout and is tried again; the run's
# deadline cuts it shorter. Generous: a long prompt's prefill on a busy GPU takes minutes.
ATTEMPT_TIMEOUT_S = 300.0
ERROR_TEXT_CHARS = 300
# A timeout this close to the run's deadline was the deadline's doing, not the model's.
DEADLINE_SLACK_S = 0.05
CHAT_PATH = "v1/chat/completions"
DEADLINE = "deadline"


class CallArgs(NamedTuple):
    url: str
    headers: dict[str, str]


class ModelHandle(Protocol):
    """What chains injects for a TrussChainlet dependency (`TrussHandle`)."""

    def http_call_args(self, *, sync_path: str | None = None) -> Any: ...


class LocalModel:
    """A `TrussHandle` stand-in for `run_local`: the local runner's deployment URL.

    `base_url` is what `./run.sh` prints without the OpenAI suffix, e.g.
    http://127.0.0.1:8080/environments/production (calls go to `<base>/sync/<path>`).
    """

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def http_call_args(self, *, sync_path: str | None = None) -> CallArgs:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else {}
        return CallArgs(f"{self.base_url}/sync/{(sync_path or '').lstrip('/')}", headers)


@dataclass(frozen=True)
class ChatEndpoint:
    url: str  # the chat completions URL itself
    headers: dict[str, str]
    model_name: str

    @classmethod
    def from_handle(cls, handle: ModelHandle, model_name: str) -> "ChatEndpoint":
        url, headers = handle.http_call_args(sync_path=CHAT_PATH)
        return cls(url, dict(headers), model_name)

    @classmethod
    def from_base_url(cls, base_url: str, api_key: str | None, model_name: str
                      ) -> "ChatEndpoint":
        """`base_url`: an OpenAI base, e.g. https://model-x.api.baseten.co/environments/
        production/sync/v1 (Baseten's keys go in `Authorization: Api-Key`)."""
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
        return cls(f"{base_url.rstrip('/')}/chat/completions", headers, model_name)


class CallFailed(Exception):
    """A model call that did not produce an answer; `reason` names why, for the result."""

    def __init__(self, reason: str, attempts: int, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.status = status


@dataclass
class Answer:
    text: str
    attempts: int
    usage: Usage


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
    except ValueError:
        message = response.text
    return str(message)[:ERROR_TEXT_CHARS]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return min(float(value), RETRY_AFTER_MAX_S) if value.replace(".", "", 1).isdigit() else None


def _backoff_s(attempt: int) -> float:
    step = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempt - 1))
    return step * random.uniform(0.5, 1.0)


def monotonic_deadline(deadline_unix: float) -> float:
    """A wall-clock deadline from another process, on this process's monotonic clock."""
    return time.monotonic() + (deadline_unix - time.time())


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def _answer(payload: dict[str, Any], attempt: int, retries: int) -> Answer:
    usage = payload.get("usage") or {}
    return Answer(text=payload["choices"][0]["message"].get("content") or "", attempts=attempt,
                  usage=Usage(model_calls=attempt, retries=retries,
                              prompt_tokens=usage.get("prompt_tokens", 0),
                              completion_tokens=usage.get("completion_tokens", 0)))


async def chat(client: httpx.AsyncClient, endpoint: ChatEndpoint, messages: Messages,
               options: CallOptions, deadline: float) -> Answer:
    """One chat completion, retried on transient failures; `deadline` is monotonic.

    Raises CallFailed. Cancellation (the run's deadline) closes the connection, which the
    model server takes as a disconnect and aborts the generation.
    """
    body = {"model": endpoint.model_name, "messages": messages,
            "max_tokens": options.max_output_tokens, "temperature": options.temperature}
    retries = 0
    for attempt in range(1, options.max_attempts + 1):
        if _remaining(deadline) <= 0:
            raise CallFailed(DEADLINE, attempt - 1)
        timeout = min(ATTEMPT_TIMEOUT_S, _remaining(deadline))
        wait: float | None = None
        try:
            response = await client.post(endpoint.url, json=body, headers=endpoint.headers,
                                         timeout=httpx.Timeout(timeout, connect=min(
                                             CONNECT_TIMEOUT_S, timeout)))
        except httpx.TimeoutException:
            if _remaining(deadline) <= DEADLINE_SLACK_S:  # cut short by the run's deadline
                raise CallFailed(DEADLINE, attempt) from None
            reason = f"timeout after {timeout:.1f} s"
            status = None
        except httpx.TransportError as exc:
            reason = f"connection failed ({type(exc).__name__})"
            status = None
        else:
            status = response.status_code
            if status == 200:
                try:
                    return _answer(response.json(), attempt, retries)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    # A proxy's error page or a cut-off body: worth another try.
                    reason = "http 200 without a chat completion in its body"
            else:
                reason = f"http {status}: {_error_text(response)}"
                if status not in RETRYABLE_STATUSES:
                    raise CallFailed(reason, attempt, status)
                wait = _retry_after(response)
        if attempt == options.max_attempts:
            raise CallFailed(reason, attempt, status)
        wait = wait if wait is not None else _backoff_s(attempt)
        if _remaining(deadline) <= wait:
            raise CallFailed(f"{reason}; no time left to retry", attempt, status)
        retries += 1
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


async def stream_chat(client: httpx.AsyncClient, endpoint: ChatEndpoint, messages: Messages,
                      options: CallOptions) -> AsyncIterator[str]:
    """The answer's text as the model produces it (one attempt: a stream cannot rewind)."""
    body = {"model": endpoint.model_name, "messages": messages, "stream": True,
            "max_tokens": options.max_output_tokens, "temperature": options.temperature}
    async with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers,
                             timeout=httpx.Timeout(ATTEMPT_TIMEOUT_S,
                                                   connect=CONNECT_TIMEOUT_S)) as response:
        if response.status_code != 200:
            await response.aread()
            raise CallFailed(f"http {response.status_code}: {_error_text(response)}", 1,
                             response.status_code)
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            choices = json.loads(line[len("data:"):]).get("choices") or [{}]
            delta = choices[0].get("delta", {}).get("content")
            if delta:
                yield delta


async def run_bounded(count: int, concurrency: int, deadline: float,
                      work: Callable[[int], Awaitable[None]]) -> bool:
    """`work(i)` for i in range(count), `concurrency` at a time, until `deadline`.

    Returns False when the deadline cut it short: the calls in flight are cancelled (and
    have finished cancelling) and the ones not started never start.
    """
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            await work(index)

    try:
        async with asyncio.timeout(max(0.0, _remaining(deadline))):
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, count)):
                    group.create_task(worker())
    except TimeoutError:
        return False
    return True


def new_client(concurrency: int) -> httpx.AsyncClient:
    """One client per run: its pool is tied to the running event loop."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, trust_env=False)

