"""The gateway's key on an HTTP request, read the same way by every listener (the proxy
edge, the wrapper's API): `x-api-key` (Anthropic clients), else `Authorization: Bearer`
(OpenAI clients), compared in constant time."""

from __future__ import annotations

import hmac


def credential(headers) -> str:
    """The key a client sent (`headers`: any mapping with a case-insensitive or lowercase `get`)."""
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given


def is_key(given: str, key: str | bytes) -> bool:
    return hmac.compare_digest(given.encode(), key if isinstance(key, bytes) else key.encode())
