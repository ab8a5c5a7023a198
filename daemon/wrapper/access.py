"""Who may call the wrapper: every route but `/health` needs the gateway's key when one
is configured (`Authorization: Bearer KEY` or `x-api-key`), on every server that answers
its routes (gunicorn, the relay's doors)."""

from __future__ import annotations

from ..api_errors import error_response
from ..credentials import credential, is_key

OPEN_PATHS = ("/health",)
KEY_HINT = ("missing or wrong API key: send `Authorization: Bearer <key>` (the key is MLXGATE_API_KEY or "
            "the api_key file in the runtime folder)")


def refusal(api_key: str | None, path: str, headers, api: str) -> tuple[int, list, bytes] | None:
    """The 401 answer (status, headers, body) for a call without the key; None when it may pass."""
    if not api_key or path in OPEN_PATHS or is_key(credential(headers), api_key):
        return None
    return error_response(api, "authentication", KEY_HINT)
