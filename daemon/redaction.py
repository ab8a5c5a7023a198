"""Hide secrets before anything is logged."""

from __future__ import annotations

import re

_SECRET_KEY = re.compile(r"(api_?key|authorization|secret|password|token$|^token)", re.I)


def redact(value, secrets: tuple[str, ...]):
    """A copy of `value` with secret-looking keys and any known secret string hidden."""
    if isinstance(value, dict):
        return {k: "[redacted]" if _SECRET_KEY.search(str(k)) and not str(k).endswith("_tokens")
                else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret and secret in value:
                value = value.replace(secret, "[redacted]")
    return value
