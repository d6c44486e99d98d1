"""Errors a client can act on, in the shape of the route that produced them.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`, Baseten's predict
route answers `{"error": "<message>"}` as the truss server itself does. Either way the
status code is returned as a `Response` rather than raised: the truss server turns any
exception from model code into a 500, so a user's mistake must never leave as one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

import pydantic
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

MAX_REPORTED_VALIDATION_ERRORS = 5
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


# How long a client should wait before retrying while the engine is (re)starting.
ENGINE_RESTART_RETRY_AFTER_S = 10
# ... and when the engine is full: a generation or so frees a place.
BUSY_RETRY_AFTER_S = 1


class RequestError(Exception):
    """A request the client must fix (or, 5xx, retry); carries the status, the parameter at
    fault, and for a retryable one how long to wait."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST,
                 param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def at_capacity() -> RequestError:
    """429 with Retry-After: the model runs and queues all it may; back off and retry."""
    return RequestError("The model is at capacity: too many requests running and waiting. "
                        "Retry shortly.", HTTPStatus.TOO_MANY_REQUESTS,
                        retry_after_s=BUSY_RETRY_AFTER_S)


def engine_unavailable(detail: str = "its engine stopped") -> RequestError:
    """503 with Retry-After: the replica cannot serve now (dead engine, restarting or
    scaled to zero), and a retry soon can succeed."""
    return RequestError(f"The model is unavailable: {detail}. Retry in a few seconds.",
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        retry_after_s=ENGINE_RESTART_RETRY_AFTER_S)


def no_embeddings() -> RequestError:
    """404 for `/v1/embeddings`: this package serves generative models, and `vllm serve`
    has no embeddings route for one either."""
    return RequestError("This deployment serves a generative model, which has no "
                        "embeddings: send text to /v1/chat/completions or /v1/completions, "
                        "or deploy an embedding model for /v1/embeddings.",
                        HTTPStatus.NOT_FOUND, param="model")


def _error_type(status: int) -> str:
    """OpenAI's error types by status, as its SDK and server spell them."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        499: "client_closed_request",
        501: "not_implemented_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error(status: int, message: str, param: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type or _error_type(status),
                      "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def baseten_error(status: int, message: str, headers: dict[str, str] | None = None
                  ) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# Anthropic's error types by status (docs.anthropic.com, "Errors").
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 422: "invalid_request_error",
                         429: "rate_limit_error", 503: "overloaded_error",
                         504: "timeout_error"}


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None
                    ) -> JSONResponse:
    """Anthropic's shape, on its Messages route: the Anthropic SDK reads it."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500
                                     else "invalid_request_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=status, headers=headers)


def error_renderer_for(path: str) -> Callable[[int, str], JSONResponse]:
    """The error shape the client of `path` reads: Anthropic's on its Messages route (at
    /v1/messages or under a Baseten `.../sync` prefix), OpenAI's on the other /v1/ routes,
    Baseten's elsewhere."""
    if path.endswith("/v1/messages"):
        return anthropic_error
    return openai_error if "/v1/" in path else baseten_error


def sse_error_event(status: int, message: str) -> bytes:
    """An error inside a stream that has begun, as vLLM sends one (the OpenAI SDK raises it
    as an APIError): a client must not take a stream cut short for a complete answer."""
    error = {"error": {"message": message, "type": _error_type(status), "param": None,
                       "code": status}}
    return f"data: {json.dumps(error)}\n\n".encode()


def describe_validation_error(exc: pydantic.ValidationError, field: str | None = None
                              ) -> tuple[str, str | None]:
    """A short message naming each bad field, and the first field as OpenAI's `param`
    (`field`: the body's field that `exc` was raised for, when validated on its own)."""
    problems = []
    first_param = None
    for err in exc.errors(include_url=False, include_input=False)[:MAX_REPORTED_VALIDATION_ERRORS]:
        # Drop pydantic's internal union/function markers from the location.
        loc = ".".join(str(p) for p in ((field,) if field else ()) + tuple(err["loc"])
                       if isinstance(p, int) or ("[" not in str(p) and "-" not in str(p)))
        first_param = first_param or loc or None
        problems.append(f"{loc or 'body'}: {err['msg']}")
    extra = exc.error_count() - len(problems)
    if extra > 0:
        problems.append(f"... and {extra} more")
    return "Invalid request: " + "; ".join(problems), first_param


# What vLLM's request validators raise when a field has a shape they did not expect.
_SHAPE_ERRORS = (KeyError, AttributeError, TypeError, IndexError, RecursionError)


def validate_request(model: type[ModelT], body: Any) -> ModelT:
    """`model.model_validate(body)`, where every failure is the client's 400.

    vLLM's request models check rules across fields in `model_validator(mode="before")`
    functions that index into the raw body before pydantic has checked its shapes
    (`tool["function"]["name"]`, `structured_outputs.get(...)`): a malformed field raises a
    KeyError or AttributeError there, which pydantic passes on as it is and `vllm serve`
    answers with a 500. It is still the client's body that is wrong; the fields validated
    one by one name the culprit."""
    try:
        return model.model_validate(body)
    except _SHAPE_ERRORS as exc:
        raise _field_error(model, body) or RequestError(
            f"Invalid request: a field has the wrong shape ({type(exc).__name__}: {exc})."
        ) from None


def _field_error(model: type[pydantic.BaseModel], body: Any) -> RequestError | None:
    """A 400 naming the first field of `body` that fails its own type, if one does."""
    if not isinstance(body, dict):
        return None
    for name, field in model.model_fields.items():
        if name not in body:
            continue
        try:
            pydantic.TypeAdapter(field.rebuild_annotation()).validate_python(body[name])
        except pydantic.ValidationError as exc:
            message, param = describe_validation_error(exc, field=name)
            return RequestError(message, HTTPStatus.BAD_REQUEST, param)
        except _SHAPE_ERRORS:
            continue
    return None


def error_from_exception(exc: BaseException) -> RequestError:
    """Classify an exception raised by vLLM's serving code the way `vllm serve` does."""
    from vllm.entrypoints.serve.exception_handling.error_response import (
        create_error_response,
    )
    from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, QueueOverflowError | MaxQueuedTokensError):
        # vLLM's admission control says 503; it is the client's rate to lower, not a
        # failure: OpenAI's and Baseten's clients back off on a 429 with Retry-After.
        return at_capacity()
    if isinstance(exc, EngineDeadError):  # never a 500: the platform or runner restarts it
        logger.error("request failed: the vLLM engine is dead")
        return engine_unavailable()
    if isinstance(exc, pydantic.ValidationError):
        message, param = describe_validation_error(exc)
        return RequestError(message, HTTPStatus.BAD_REQUEST, param)
    if not isinstance(exc, Exception):
        raise exc
    info = create_error_response(exc).error
    if info.code >= 500:
        logger.exception("Engine error while serving a request", exc_info=exc)
    return RequestError(info.message, info.code, info.param)
