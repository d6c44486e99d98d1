"""The shapes of Baseten's async inference API, validated to Baseten's documented ranges.

`POST .../async_predict` takes an `AsyncPredictRequest` and answers `{"request_id"}`;
`GET /async_request/{id}` answers an `AsyncRequestRecord`; the queue-status route answers a
`QueueStatus`. The ranges are Baseten's (docs.baseten.co, async predict API reference), so
a request this runner accepts is one Baseten would accept too, and vice versa. Integers are
strict: `"priority": "1"` or `true` is a client mistake, not something to coerce.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

KiB = 1024

# Baseten rejects async_predict bodies over 256 KiB; the HTTP layer checks the raw body,
# the queue checks the serialized model_input again as a last line of defence.
MAX_MODEL_INPUT_BYTES = 256 * KiB

PRIORITY_MIN, PRIORITY_MAX, DEFAULT_PRIORITY = 0, 2, 0
MIN_TIME_IN_QUEUE_S, MAX_TIME_IN_QUEUE_S = 10, 72 * 3600  # 259,200 s
DEFAULT_TIME_IN_QUEUE_S = 600
MIN_ATTEMPTS, MAX_ATTEMPTS = 1, 10
MAX_INITIAL_DELAY_MS, MAX_MAX_DELAY_MS = 10_000, 60_000
# Baseten documents the ranges of the retry fields but not their defaults; these are ours:
# one attempt (no retry unless asked for), then 1 s doubling up to 5 s.
DEFAULT_MAX_ATTEMPTS = 1
DEFAULT_INITIAL_DELAY_MS = 1_000
DEFAULT_MAX_DELAY_MS = 5_000
MAX_WEBHOOK_URL_LENGTH = 2_048
# Baseten requires https; a local stand-in must also reach webhooks on http://127.0.0.1.
WEBHOOK_SCHEMES = frozenset({"http", "https"})

StrictInt = Annotated[int, Field(strict=True)]


class AsyncStatus(StrEnum):
    """`status` of an async request, spelled as Baseten spells it."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELED = "CANCELED"
    WEBHOOK_FAILED = "WEBHOOK_FAILED"


class WebhookStatus(StrEnum):
    """`webhook_status`: whether the result reached the caller's webhook."""

    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    NO_WEBHOOK_PROVIDED = "NO_WEBHOOK_PROVIDED"


class AsyncErrorCode(StrEnum):
    """The error codes Baseten lists for `errors[].code`, plus EXPIRED for our expiry."""

    MODEL_PREDICT_ERROR = "MODEL_PREDICT_ERROR"
    MODEL_PREDICT_TIMEOUT = "MODEL_PREDICT_TIMEOUT"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    MODEL_DOES_NOT_EXIST = "MODEL_DOES_NOT_EXIST"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    MODEL_INVALID_INPUT = "MODEL_INVALID_INPUT"
    ASYNC_REQUEST_NOT_SUPPORTED = "ASYNC_REQUEST_NOT_SUPPORTED"
    INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"
    # Not in Baseten's list (which has no code for a request that expired in the queue);
    # kept as one named value so it is easy to change.
    EXPIRED = "EXPIRED"


class RetryConfig(BaseModel):
    """`inference_retry_config`: exponential backoff between attempts at the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: StrictInt = Field(DEFAULT_MAX_ATTEMPTS, ge=MIN_ATTEMPTS, le=MAX_ATTEMPTS)
    initial_delay_ms: StrictInt = Field(DEFAULT_INITIAL_DELAY_MS, ge=0, le=MAX_INITIAL_DELAY_MS)
    max_delay_ms: StrictInt = Field(DEFAULT_MAX_DELAY_MS, ge=0, le=MAX_MAX_DELAY_MS)


class AsyncPredictRequest(BaseModel):
    """The body of `POST .../async_predict`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_input: JsonValue = Field(description="Passed to the model's predict unchanged.")
    webhook_endpoint: str | None = Field(None, max_length=MAX_WEBHOOK_URL_LENGTH)
    priority: StrictInt = Field(DEFAULT_PRIORITY, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    max_time_in_queue_seconds: StrictInt = Field(
        DEFAULT_TIME_IN_QUEUE_S, ge=MIN_TIME_IN_QUEUE_S, le=MAX_TIME_IN_QUEUE_S)
    inference_retry_config: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("webhook_endpoint")
    @classmethod
    def _webhook_is_http_url(cls, value: str | None) -> str | None:
        # An empty string means "no webhook", as Baseten documents for an empty endpoint.
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme.lower() not in WEBHOOK_SCHEMES or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. https://example.com/hook")
        return value

    @field_validator("inference_retry_config", mode="before")
    @classmethod
    def _null_retry_config_is_default(cls, value: object) -> object:
        return RetryConfig() if value is None else value


class AsyncError(BaseModel):
    """One entry of `errors`."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class AsyncRequestRecord(BaseModel):
    """The body of `GET /async_request/{request_id}`; timestamps are ISO-8601 in UTC."""

    request_id: str
    model_id: str
    deployment_id: str
    status: AsyncStatus
    webhook_status: WebhookStatus
    created_at: str
    status_at: str
    errors: list[AsyncError] = Field(default_factory=list)


class QueueStatus(BaseModel):
    """The body of the async queue-status route."""

    model_id: str
    deployment_id: str
    num_queued_requests: int
    num_in_progress_requests: int
