"""The rules every JSON request body follows, wherever it is read (proxy edge, relay), and
the one way bodies are written back out. orjson: a long agent conversation is parsed and
written on every turn, and orjson does that several times faster than `json`."""

from __future__ import annotations

import json

import orjson


def parse_object(raw: bytes) -> dict:
    """The body as a dict; `ValueError` with a message for the client otherwise."""
    if not raw.strip():
        raise ValueError("the request body is empty: send a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        problem = str(exc)
        if "UTF-8" in problem:
            raise ValueError("the request body is not valid UTF-8") from None
        if "depth limit" in problem or "recursion" in problem:
            raise ValueError("the request body is nested too deeply") from None
        raise ValueError(f"the request body is not valid JSON: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def dump(data) -> bytes:
    """`data` as JSON bytes (a plugin may have put in what orjson refuses, e.g. a huge int)."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, default=str).encode()
