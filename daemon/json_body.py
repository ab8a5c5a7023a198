"""The rules every JSON request body follows, wherever it is read (proxy front, relay)."""

from __future__ import annotations

import json


def parse_object(raw: bytes) -> dict:
    """The body as a dict; `ValueError` with a message for the client otherwise."""
    if not raw.strip():
        raise ValueError("the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("the request body is not valid UTF-8") from None
    except RecursionError:
        raise ValueError("the request body is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data
