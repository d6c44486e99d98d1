"""Run queued async requests through the model and deliver their webhooks.

A fixed number of workers claim jobs from the persistent queue (highest priority first),
call the model's predict route in-process, bounded by the async run timeout, and record the
outcome; failures are retried per the request's `inference_retry_config`. At start-up the
queue is recovered from a crash (requests that were running go back to the queue, so they
run at least once more) and webhooks that were never delivered are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import Histogram

from truss_llm.runner import webhooks
from truss_llm.runner.models import AsyncErrorCode, AsyncStatus
from truss_llm.runner.queue import AsyncQueue, Job
from truss_llm.runner.settings import RunnerSettings

logger = logging.getLogger(__name__)

CallModel = Callable[[bytes], Awaitable[tuple[int, bytes]]]
IDLE_POLL_S = 0.5  # upper bound on a worker's sleep when the queue gives no wake-up time
ERROR_MESSAGE_CHARS = 2000

ASYNC_LATENCY = Histogram("baseten_surface_async_seconds",
                          "Async request time from enqueue to its final status.", ["status"],
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 14400))


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = None
    return str(text or body[:ERROR_MESSAGE_CHARS].decode(errors="replace"))


class AsyncWorker:
    def __init__(self, queue: AsyncQueue, settings: RunnerSettings, call_model: CallModel
                 ) -> None:
        self._queue = queue
        self._settings = settings
        self._call_model = call_model
        self._wakeup = asyncio.Event()
        self._webhook_tasks: set[asyncio.Task] = set()
        self.webhook_policy = webhooks.webhook_policy(settings.webhook_allowed_networks)

    def notify(self) -> None:
        """A request was enqueued: wake an idle worker now instead of at its next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        recovered = await asyncio.to_thread(self._queue.recover_after_crash)
        if recovered:
            logger.warning("%d async requests were running when the runner stopped; "
                           "they are queued again", recovered)
        for job in await asyncio.to_thread(self._queue.pending_webhooks):
            self._send_webhook(job)
        workers = [asyncio.create_task(self._work(n))
                   for n in range(self._settings.worker_concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in [*workers, *self._webhook_tasks]:
                task.cancel()
            for task in [*workers, *self._webhook_tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _work(self, number: int) -> None:
        while True:
            for expired in await asyncio.to_thread(self._queue.expire_overdue):
                self._finished(expired, AsyncStatus.EXPIRED)
            self._wakeup.clear()
            job = await asyncio.to_thread(self._queue.claim_next)
            if job is None:
                wait = await asyncio.to_thread(self._queue.next_wakeup)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(),
                                           min(wait if wait is not None else IDLE_POLL_S,
                                               IDLE_POLL_S))
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        logger.debug("async request %s: attempt %d of %d", job.request_id, job.attempts,
                    job.max_attempts)
        try:
            async with asyncio.timeout(self._settings.async_run_timeout_s):
                status, body = await self._call_model(job.model_input_json.encode())
        except TimeoutError:
            await self._fail(job, AsyncErrorCode.MODEL_PREDICT_TIMEOUT,
                             f"The model did not finish within "
                             f"{self._settings.async_run_timeout_s:.0f} s.", retryable=True)
            return
        except Exception as exc:  # the model call itself broke: retry as Baseten would
            logger.exception("async request %s: model call failed", job.request_id)
            await self._fail(job, AsyncErrorCode.MODEL_UNAVAILABLE, str(exc), retryable=True)
            return
        if 200 <= status < 300:
            done = await asyncio.to_thread(self._queue.complete, job.request_id,
                                           body.decode(errors="replace"))
            self._finished(done, AsyncStatus.SUCCEEDED, output=body)
        elif 400 <= status < 500 and status != HTTPStatus.TOO_MANY_REQUESTS:
            # The input is wrong: another attempt would fail the same way. (A 429 is the
            # model at capacity: retried, as a 5xx is.)
            await self._fail(job, AsyncErrorCode.MODEL_INVALID_INPUT, _error_text(body),
                             retryable=False)
        else:
            await self._fail(job, AsyncErrorCode.MODEL_PREDICT_ERROR,
                             f"HTTP {status}: {_error_text(body)}", retryable=True)

    async def _fail(self, job: Job, code: AsyncErrorCode, message: str, *,
                    retryable: bool) -> None:
        outcome = await asyncio.to_thread(self._queue.fail, job.request_id, code.value,
                                          message, retryable=retryable)
        logger.warning("async request %s attempt %d failed (%s): %s", job.request_id,
                       job.attempts, code.value, outcome)
        if outcome == "failed":
            failed = await asyncio.to_thread(self._queue.get_job, job.request_id)
            self._finished(failed, AsyncStatus.FAILED)
        else:
            self.notify()

    def _finished(self, job: Job | None, status: AsyncStatus, output: bytes | None = None
                  ) -> None:
        if job is None:
            return
        ASYNC_LATENCY.labels(status.value).observe(max(0.0, time.time() - job.created_at))
        if job.webhook_endpoint:
            self._send_webhook(job, output)

    def _send_webhook(self, job: Job, output: bytes | None = None) -> None:
        task = asyncio.create_task(self._deliver(job, output))
        self._webhook_tasks.add(task)
        task.add_done_callback(self._webhook_tasks.discard)

    async def _deliver(self, job: Job, output: bytes | None) -> None:
        raw = output if output is not None else (
            job.output_json.encode() if job.output_json else None)
        data = json.loads(raw) if raw else None
        errors = [error.model_dump() for error in job.errors]
        body = webhooks.payload(job.request_id, self._settings.model_id,
                                self._settings.deployment_id, data, errors)
        ok = await webhooks.deliver(
            job.webhook_endpoint, body, self._settings.webhook_secret,
            policy=self.webhook_policy,
            attempts=self._settings.webhook_attempts,
            backoff_s=self._settings.webhook_backoff_s,
            timeout_s=self._settings.webhook_timeout_s)
        await asyncio.to_thread(self._queue.set_webhook_result, job.request_id, ok)
