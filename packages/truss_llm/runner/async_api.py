"""Baseten's async inference API over the runner's queue: `POST .../async_predict`,
`GET`/`DELETE /async_request/{id}` and `GET .../async_queue_status`.

The queue and its workers live in `queue.py` and `worker.py`; this module only validates,
enqueues and answers, in Baseten's error shape (`{"error": "<message>"}`). A store that
fails (store_health.py) is a 503 with Retry-After on these routes, never a 500, and on the
readiness probe too while it stays broken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pydantic
from prometheus_client import Gauge
from starlette.responses import JSONResponse, Response

from truss_llm.cancellation import ClientDisconnected
from truss_llm.errors import baseten_error, describe_validation_error
from truss_llm.media.policy import FetchError
from truss_llm.runner import webhooks
from truss_llm.runner.body import BodyTooLarge, read_body
from truss_llm.runner.models import AsyncPredictRequest
from truss_llm.runner.queue import (
    AsyncQueue,
    PayloadTooLargeError,
    QueueFullError,
    QueueUnavailable,
)
from truss_llm.runner.settings import RunnerSettings
from truss_llm.runner.worker import AsyncWorker

logger = logging.getLogger(__name__)

# Read at scrape time (one indexed COUNT each), not on every claim.
QUEUED = Gauge("baseten_surface_async_queued_requests", "Async requests queued.")
IN_PROGRESS = Gauge("baseten_surface_async_in_progress_requests",
                    "Async requests in progress.")


class AsyncApi:
    def __init__(self, queue: AsyncQueue, worker: AsyncWorker,
                 settings: RunnerSettings) -> None:
        self.queue = queue
        self.worker = worker
        self.settings = settings
        # set_function replaces the last one: a second surface in one process (tests)
        # reports its own queue.
        QUEUED.set_function(lambda: _depth(queue, "num_queued_requests"))
        IN_PROGRESS.set_function(lambda: _depth(queue, "num_in_progress_requests"))

    def readiness_refusal(self) -> Response | None:
        """The readiness probe's 503 while the store stays broken (nothing would run what
        async_predict took), else None."""
        try:
            self.queue.check_available()
        except QueueUnavailable as exc:
            return unavailable(exc)
        return None

    async def predict(self, scope: dict, receive: Callable, environment: str) -> Response:
        limit = self.settings.max_async_input_bytes
        try:
            body = await read_body(scope, receive, limit)
            raw = body.read()
            body.close()
        except BodyTooLarge:
            return baseten_error(413, f"The async_predict body exceeds {limit:,} bytes "
                                      "(256 KiB). Put large inputs in object storage and "
                                      "send pre-signed URLs in model_input.")
        except ClientDisconnected:
            return baseten_error(499, "client disconnected")
        try:
            request = AsyncPredictRequest.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            message, _ = describe_validation_error(exc)
            return baseten_error(400, message)
        if request.webhook_endpoint is not None:
            try:
                webhooks.check_endpoint(request.webhook_endpoint, self.worker.webhook_policy)
            except FetchError as exc:
                return baseten_error(400, f"webhook_endpoint: {exc.message}")
        if isinstance(request.model_input, dict) and request.model_input.get("stream"):
            return baseten_error(400, "Streaming is not available through async predict: "
                                      "set model_input.stream to false.")
        try:
            request_id = await asyncio.to_thread(self.queue.enqueue, request, environment)
        except QueueUnavailable as exc:  # a full disk, a lock held too long, a broken store
            return unavailable(exc)
        except QueueFullError as exc:
            return baseten_error(429, f"{exc}. Retry with backoff.")
        except PayloadTooLargeError as exc:
            return baseten_error(413, str(exc))
        except ValueError as exc:  # NaN or infinity in model_input
            return baseten_error(400, f"model_input is not valid JSON: {exc}")
        self.worker.notify()
        logger.debug("async request %s queued (priority %d)", request_id, request.priority)
        return JSONResponse({"request_id": request_id}, status_code=201)

    async def request(self, request_id: str, method: str) -> Response:
        """`GET` (the record) or `DELETE` (cancel a queued request) `/async_request/{id}`."""
        try:
            return await self._request(request_id, method)
        except QueueUnavailable as exc:
            return unavailable(exc)

    async def _request(self, request_id: str, method: str) -> Response:
        if method not in ("GET", "DELETE") or not request_id or "/" in request_id:
            return baseten_error(404, "Use GET or DELETE /async_request/{request_id}.")
        if method == "DELETE":
            record = await asyncio.to_thread(self.queue.get, request_id)
            if record is None:
                return baseten_error(404, f"No async request {request_id}.")
            if not await asyncio.to_thread(self.queue.cancel, request_id):
                return baseten_error(400, f"Async request {request_id} is {record.status} "
                                          "and can no longer be canceled.")
            return JSONResponse({"request_id": request_id, "canceled": True,
                                 "message": "Request canceled."})
        record = await asyncio.to_thread(self.queue.get, request_id)
        if record is None:
            return baseten_error(404, f"No async request {request_id}.")
        return JSONResponse(record.model_dump(mode="json"))

    async def queue_status(self) -> Response:
        try:
            status = await asyncio.to_thread(self.queue.queue_status)
        except QueueUnavailable as exc:
            return unavailable(exc)
        return JSONResponse(status.model_dump(mode="json"))


def unavailable(exc: QueueUnavailable) -> Response:
    return baseten_error(503, str(exc), exc.headers)


def _depth(queue: AsyncQueue, field: str) -> float:
    """A queue depth for a scrape; NaN when the store cannot be read (the scrape goes on)."""
    try:
        return getattr(queue.queue_status(), field)
    except QueueUnavailable:
        return float("nan")
