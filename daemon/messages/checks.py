"""Field checks both APIs' request checks share; errors name the field like the APIs do."""

from __future__ import annotations

import json

from ..errors import invalid

__all__ = ["MAX_TOKENS_LIMIT", "check_number", "check_token_limit", "invalid", "shown"]

MAX_TOKENS_LIMIT = 2 ** 31  # both APIs take a 32-bit signed integer


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


def check_token_limit(body: dict, key: str) -> int | None:
    """`body[key]` if absent or an integer from 1 to MAX_TOKENS_LIMIT - 1; else a 400 naming the field."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key}: Input should be a valid integer, got {shown(value)}")
    if value < 1:
        raise invalid(f"{key}: Input should be greater than or equal to 1, got {value}")
    if value >= MAX_TOKENS_LIMIT:
        raise invalid(f"{key}: Input should be less than {MAX_TOKENS_LIMIT}, got {value}")
    return value


def message_role(i: int, message, roles: tuple[str, ...]) -> str:
    """The role of `messages[i]`, checked: an object whose `role` is one of `roles`."""
    if not isinstance(message, dict):
        raise invalid(f"messages.{i}: Input should be an object with `role` and `content`")
    role = message.get("role")
    if role not in roles:
        raise invalid(f"messages.{i}.role: Input should be one of {', '.join(roles)}, got {shown(role)}")
    return role
