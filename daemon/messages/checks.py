"""Field checks both APIs' request checks share; errors name the field like the APIs do."""

from __future__ import annotations

import json

from ..errors import RequestRejected


def invalid(message: str) -> RequestRejected:
    return RequestRejected(400, message, "invalid_request")


def shown(value) -> str:
    """A short rendering of a bad value for an error message."""
    return json.dumps(value, default=str)[:40]


def check_number(body: dict, key: str, low: float, high: float | None = None) -> float | None:
    """`body[key]` if absent or a number within [low, high]; else a 400 naming the field."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{key}: Input should be a valid number, got {shown(value)}")
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"greater than or equal to {low:g}"
        raise invalid(f"{key}: Input should be {bound}, got {value}")
    return value
