"""Run queued async requests through the model and deliver their webhooks.

A fixed number of workers claim jobs from the persistent queue (highest priority first),
call the model's predict route in-process, bounded by the async run timeout, and record the
outcome; failures are retried per the request's `inference_retry_config`. At start-up the
queue is recovered from a crash (requests that were running go back to the queue, so they
run at least once more) and webhooks that were never delivered are sent again.

The store can fail (a lock held by another process, a full disk): a worker then logs, backs
off (bounded, exponential) and goes on; an outcome it could not record (a result, a failure,
a webhook's delivery) is kept in memory and recorded once the store takes it. Two tasks
beside the workers: one expires requests past their queue time (on time even while every
worker is busy) and one purges settled requests after the retention period, in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import Counter, Histogram

from truss_llm.runner import webhooks
from truss_llm.runner.models import AsyncErrorCode, AsyncStatus
from truss_llm.runner.queue import PURGE_BATCH, AsyncQueue, Job, QueueUnavailable, backoff_delay_s
from truss_llm.runner.settings import RunnerSettings
from truss_llm.runner.store_health import StoreHealth

logger = logging.getLogger(__name__)

CallModel = Callable[[bytes], Awaitable[tuple[int, bytes]]]
IDLE_POLL_S = 0.5  # upper bound on a worker's sleep when the queue gives no wake-up time
# How often requests past max_time_in_queue_seconds are expired (and their webhooks sent),
# by a task of its own: a request expires on time even while every worker runs a long job.
EXPIRE_CHECK_S = 1.0
ERROR_MESSAGE_CHARS = 2000
# A worker whose store (or anything else) failed waits 0.5 s, 1 s, 2 s, ... up to 10 s between
# tries: quick to notice a store that recovers, no busy loop against one that does not.
STORE_BACKOFF_INITIAL_MS = 500
STORE_BACKOFF_MAX_MS = 10_000
# Purges run at most this far apart, and at least 4 times per retention period (so a settled
# request lives at most 1.25 retention periods).
PURGE_INTERVAL_S = 3600.0
PURGES_PER_RETENTION = 4

ASYNC_LATENCY = Histogram("baseten_surface_async_seconds",
                          "Async request time from enqueue to its final status.", ["status"],
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 14400))
PURGED = Counter("baseten_surface_async_purged_requests_total",
                 "Settled async requests deleted after the retention period.")


def store_backoff_s(failures: int) -> float:
    return backoff_delay_s(failures, STORE_BACKOFF_INITIAL_MS, STORE_BACKOFF_MAX_MS)


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = None
    return str(text or body[:ERROR_MESSAGE_CHARS].decode(errors="replace"))


def open_queue(settings: RunnerSettings) -> AsyncQueue:
    """The runner's queue, on the store its settings describe."""
    return AsyncQueue(settings.queue_path, settings.model_id, settings.deployment_id,
                      busy_timeout_s=settings.queue_busy_timeout_s,
                      max_bytes=settings.queue_max_bytes,
                      health=StoreHealth(settings.queue_unhealthy_after_s))


class AsyncWorker:
    def __init__(self, queue: AsyncQueue, settings: RunnerSettings, call_model: CallModel
                 ) -> None:
        self._queue = queue
        self._settings = settings
        self._call_model = call_model
        self._wakeup = asyncio.Event()
        # Set by the first task to see the store work again after failing: the others cut
        # their backoff short (an expiry's webhook should not wait out a 10 s backoff).
        self._store_back = asyncio.Event()
        self._webhook_tasks: set[asyncio.Task] = set()
        self.webhook_policy = webhooks.webhook_policy(settings.webhook_allowed_networks)

    def notify(self) -> None:
        """A request was enqueued: wake an idle worker now instead of at its next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        # Before any claim: a recovery after a claim would requeue that running request.
        recovered = await self._persist("crash recovery", self._queue.recover_after_crash)
        if recovered:
            logger.warning("%d async requests were running when the runner stopped; "
                           "they are queued again", recovered)
        for job in await self._persist("pending webhooks", self._queue.pending_webhooks):
            self._send_webhook(job)
        workers = [asyncio.create_task(self._work(n))
                   for n in range(self._settings.worker_concurrency)]
        workers.append(asyncio.create_task(self._expire()))
        workers.append(asyncio.create_task(self._purge()))
        try:
            await asyncio.gather(*workers)
        finally:
            for task in [*workers, *self._webhook_tasks]:
                task.cancel()
            for task in [*workers, *self._webhook_tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _work(self, number: int) -> None:
        """Claim and run requests, forever: no exception ends a worker."""
        failures = 0
        while True:
            try:
                await self._step()
                failures = self._worked(failures)
            except Exception as exc:  # not CancelledError: that ends the worker
                failures += 1
                delay = store_backoff_s(failures)
                if isinstance(exc, QueueUnavailable):  # the queue logged the store's error
                    logger.warning("async worker %d: the queue is unavailable (%d in a row);"
                                   " retrying in %.1f s", number, failures, delay)
                else:
                    logger.exception("async worker %d failed (%d in a row); retrying in "
                                     "%.1f s", number, failures, delay)
                await self._back_off(delay)

    async def _step(self) -> None:
        """Run one request, or wait for one to become runnable."""
        self._wakeup.clear()
        job = await asyncio.to_thread(self._queue.claim_next)
        if job is None:
            wait = await asyncio.to_thread(self._queue.next_wakeup)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(),
                                       min(wait if wait is not None else IDLE_POLL_S,
                                           IDLE_POLL_S))
            return
        await self._run(job)

    async def _persist(self, what: str, call: Callable, *args: object) -> object:
        """Run a queue call until the store takes it: what it records (a result, a failure,
        a delivery) exists only in memory until then. A failed call changed nothing (its
        transaction was rolled back), so it is safe to repeat."""
        failures = 0
        while True:
            try:
                result = await asyncio.to_thread(call, *args)
            except QueueUnavailable:
                failures += 1
                delay = store_backoff_s(failures)
                logger.warning("async queue: could not record %s (%d tries); retrying in "
                               "%.1f s", what, failures, delay)
                await self._back_off(delay)
            else:
                self._worked(failures)
                return result

    def _worked(self, failures: int) -> int:
        """A store call succeeded; after failures, wake the tasks backing off. Returns 0."""
        if failures:
            self._store_back.set()
            self._wakeup.set()
        return 0

    async def _back_off(self, delay: float) -> None:
        """Sleep `delay`, or less if another task sees the store work again meanwhile."""
        self._store_back.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._store_back.wait(), delay)

    async def _expire(self) -> None:
        """Expire overdue requests and send their webhooks, every EXPIRE_CHECK_S. This is
        also what notices a failing store while every worker is busy running."""
        failures = 0
        while True:
            try:
                for expired in await asyncio.to_thread(self._queue.expire_overdue):
                    self._finished(expired, AsyncStatus.EXPIRED)
                failures = self._worked(failures)
            except Exception as exc:
                failures += 1
                delay = max(EXPIRE_CHECK_S, store_backoff_s(failures))
                if not isinstance(exc, QueueUnavailable):  # the queue logged its own
                    logger.exception("async queue: expiry failed; retrying in %.1f s", delay)
                await self._back_off(delay)
            else:
                await asyncio.sleep(EXPIRE_CHECK_S)

    async def _purge(self) -> None:
        """Delete settled requests older than the retention period, batch by batch."""
        retention = self._settings.async_retention_s
        interval = min(PURGE_INTERVAL_S, retention / PURGES_PER_RETENTION)
        while True:
            purged = 0
            try:
                older_than = time.time() - retention
                while True:
                    batch = await asyncio.to_thread(self._queue.purge_finished, older_than)
                    purged += batch
                    if batch < PURGE_BATCH:
                        break
            except QueueUnavailable:
                logger.warning("async queue: purge failed; next try in %.0f s", interval)
            except Exception:
                logger.exception("async queue: purge failed; next try in %.0f s", interval)
            if purged:
                PURGED.inc(purged)
                logger.info("async queue: purged %d settled requests older than %.0f s",
                            purged, retention)
            await asyncio.sleep(interval)

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
            done = await self._persist(f"the result of {job.request_id}", self._queue.complete,
                                       job.request_id, body.decode(errors="replace"))
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
        outcome = await self._persist(
            f"the failure of {job.request_id}",
            functools.partial(self._queue.fail, retryable=retryable),
            job.request_id, code.value, message)
        logger.warning("async request %s attempt %d failed (%s): %s", job.request_id,
                       job.attempts, code.value, outcome)
        if outcome == "failed":
            failed = await self._persist(f"the record of {job.request_id}",
                                         self._queue.get_job, job.request_id)
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
        await self._persist(f"the webhook result of {job.request_id}",
                            self._queue.set_webhook_result, job.request_id, ok)
