"""Webhook delivery of async results, signed the way Baseten signs them.

Payload: `{request_id, model_id, deployment_id, type, time, data, errors}`; header
`X-BASETEN-SIGNATURE: v1=<hex HMAC-SHA256 of the exact body>` under the configured secret.
Delivery is retried with exponential backoff; the caller records the outcome.

A webhook URL is the caller's, so sending to it is the same SSRF risk as fetching media:
it goes through the media fetcher's address policy (any public host; no private,
loopback, link-local or metadata address unless its network is allowed by a setting),
its host is resolved once per delivery and the connection pinned to the checked address,
redirects are not followed, and proxy variables and .netrc are ignored.
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

from truss_llm.media.fetch import (
    PinnedBackend,
    PinnedTransport,
    Resolver,
    install_url_redaction,
    ssl_context,
    system_resolver,
)
from truss_llm.media.policy import FetchError, FetchPolicy, check_address, check_url, dial_address

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


def webhook_policy(allowed_networks: tuple[str, ...] = ()) -> FetchPolicy:
    """Any host, http or https; only public addresses, but for `allowed_networks`."""
    return FetchPolicy(allow_http=True, allowed_hosts=("*",),
                       allowed_networks=allowed_networks, max_redirects=0)


def check_endpoint(url: str, policy: FetchPolicy) -> None:
    """What can be judged without DNS, at enqueue: scheme, user info, an address host.
    Raises FetchError (400) with a message naming the problem."""
    target = check_url(url, policy)
    if target.ip is not None:
        check_address(target.ip, policy)


async def _pinned_client(url: str, policy: FetchPolicy, resolver: Resolver
                         ) -> httpx.AsyncClient:
    target = check_url(url, policy)
    answers = [target.ip] if target.ip else [
        str(a) for a in await resolver(target.host, target.port)]
    for answer in answers:  # every answer: a host with one private address is refused
        check_address(answer, policy)
    addresses = list(dict.fromkeys(dial_address(a) for a in answers))
    return httpx.AsyncClient(
        transport=PinnedTransport(PinnedBackend(target.host, addresses), ssl_context()),
        trust_env=False, follow_redirects=False)


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


async def deliver(url: str, body: bytes, secret: str | None, *, policy: FetchPolicy,
                  attempts: int, backoff_s: float, timeout_s: float,
                  resolver: Resolver = system_resolver) -> bool:
    """POST the body until a 2xx answer or `attempts` tries; True if delivered. A URL the
    policy refuses is not tried at all."""
    headers = {"content-type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    client: httpx.AsyncClient | None = None
    try:
        for attempt in range(1, attempts + 1):
            try:
                if client is None:  # resolved once (until DNS answers), then pinned
                    client = await _pinned_client(url, policy, resolver)
                response = await client.post(url, content=body, headers=headers,
                                             timeout=timeout_s)
                if response.is_success:
                    logger.info("webhook delivered to %s (attempt %d)", redact(url), attempt)
                    return True
                reason = f"HTTP {response.status_code}"
            except FetchError as exc:
                logger.warning("webhook to %s refused: %s", redact(url), exc.message)
                return False
            except (httpx.HTTPError, OSError) as exc:
                reason = type(exc).__name__
            logger.warning("webhook to %s failed (%s), attempt %d of %d", redact(url), reason,
                           attempt, attempts)
            if attempt < attempts:
                await asyncio.sleep(min(backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S))
        return False
    finally:
        if client is not None:
            await client.aclose()
