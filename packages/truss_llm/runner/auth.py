"""The runner's API key: `Authorization: Api-Key <key>`, as Baseten asks for it, or
`Bearer <key>`, which is what the OpenAI SDK sends. Checked on every route, truss's own
included; with no key set (loopback only, see settings) every request passes."""

from __future__ import annotations

import hmac

ACCEPTED_SCHEMES = ("api-key", "bearer")
MISSING_KEY = "Missing or invalid API key: send the header 'Authorization: Api-Key <key>'."
WS_POLICY_VIOLATION = 1008  # RFC 6455's close code for a refused client


def authorized(scope: dict, api_key: str | None) -> bool:
    if api_key is None:
        return True
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, given = header.partition(" ")
    if scheme.lower() not in ACCEPTED_SCHEMES:
        return False
    return hmac.compare_digest(given.strip().encode(), api_key.encode())
