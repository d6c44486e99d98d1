"""Webhook delivery of async results, signed the way Baseten signs them.

Payload: `{request_id, model_id, deployment_id, type, time, data, errors}`; header
`X-BASETEN-SIGNATURE: v1=<hex HMAC-SHA256 of the exact body>` under the configured secret.
Delivery is retried with exponential backoff; the caller records the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from truss_llm.media.fetch import install_url_redaction

logger = logging.getLogger(__name__)
install_url_redaction()  # a webhook URL's query may carry a token: never in a log line

SIGNATURE_HEADER = "X-BASETEN-SIGNATURE"
EVENT_TYPE = "async_request_completed"
BACKOFF_MAX_S = 30.0


def sign(body: bytes, secret: str) -> str:
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str, secret: str) -> bool:
    """True if any `v1=` signature in the header matches (Baseten lists one per secret)."""
    expected = sign(body, secret)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(","))


def redact(url: str) -> str:
    """Host and path only: a webhook URL's query may carry a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


def payload(request_id: str, model_id: str, deployment_id: str, data: Any,
            errors: list[dict[str, str]]) -> bytes:
    return json.dumps({
        "request_id": request_id,
        "model_id": model_id,
        "deployment_id": deployment_id,
        "type": EVENT_TYPE,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
        "errors": errors,
    }, separators=(",", ":")).encode()


async def deliver(client: httpx.AsyncClient, url: str, body: bytes, secret: str | None, *,
                  attempts: int, backoff_s: float, timeout_s: float) -> bool:
    """POST the body until a 2xx answer or `attempts` tries; True if delivered."""
    headers = {"content-type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    for attempt in range(1, attempts + 1):
        try:
            response = await client.post(url, content=body, headers=headers, timeout=timeout_s)
            if response.is_success:
                logger.info("webhook delivered to %s (attempt %d)", redact(url), attempt)
                return True
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
        logger.warning("webhook to %s failed (%s), attempt %d of %d", redact(url), reason,
                       attempt, attempts)
        if attempt < attempts:
            await asyncio.sleep(min(backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S))
    return False
