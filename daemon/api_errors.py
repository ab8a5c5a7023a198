"""The one table from our error kinds to an HTTP status and each API's error shape.

Anthropic clients get ``{"type": "error", "error": {"type", "message"}}``; OpenAI clients
(chat, completions and the Responses API) ``{"error": {"message", "type", "param", "code"}}``;
Ollama clients ``{"error": "message"}`` (a stream's error is that object on a line of its own).
Both official SDKs retry 408, 409, 429 and every 5xx unless the answer says
``x-should-retry: false``; a kind whose retry cannot help says so. A stream that has
already answered 200 ends with the same error as an event instead (`error_event`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import MlxgateError, RequestRejected

ANTHROPIC = "anthropic"
OPENAI = "openai"
RESPONSES = "responses"  # OpenAI's error shape; a stream's error is the Responses API's `error` event
OLLAMA = "ollama"        # Ollama's API on its own port (see `proxy.ollama_edge`)


@dataclass(frozen=True)
class Kind:
    status: int
    anthropic_type: str
    openai_type: str
    openai_code: str | None = None
    openai_status: int | None = None   # when OpenAI clients get another status
    should_retry: bool | None = None   # x-should-retry; None: the SDKs' own rule
    retry_after: bool = False          # send Retry-After


KINDS: dict[str, Kind] = {
    "invalid_request": Kind(400, "invalid_request_error", "invalid_request_error"),
    "context_length_exceeded": Kind(400, "invalid_request_error", "invalid_request_error",
                                    "context_length_exceeded"),
    "authentication": Kind(401, "authentication_error", "authentication_error", "invalid_api_key"),
    "permission": Kind(403, "permission_error", "permission_error"),
    "not_found": Kind(404, "not_found_error", "invalid_request_error", "model_not_found"),
    "response_not_found": Kind(404, "not_found_error", "invalid_request_error"),
    "request_too_large": Kind(413, "request_too_large", "invalid_request_error", "request_too_large"),
    "rate_limit": Kind(429, "rate_limit_error", "rate_limit_error", retry_after=True),
    "overloaded": Kind(529, "overloaded_error", "server_error", "overloaded", openai_status=503,
                       retry_after=True),
    "unavailable": Kind(503, "api_error", "server_error", "service_unavailable", retry_after=True),
    "model_load_failed": Kind(503, "api_error", "server_error", "model_load_failed", should_retry=False),
    "model_too_large": Kind(503, "api_error", "server_error", "model_too_large", should_retry=False),
    "insufficient_memory": Kind(503, "api_error", "server_error", "insufficient_memory", retry_after=True),
    "backend_error": Kind(502, "api_error", "server_error", "backend_error"),
    "api_error": Kind(500, "api_error", "server_error"),
}


def _status_kinds() -> dict[int, str]:
    """Each status to the first kind in KINDS that answers it (for any API)."""
    kinds: dict[int, str] = {}
    for kind, spec in KINDS.items():
        for status in (spec.status, spec.openai_status):
            if status is not None:
                kinds.setdefault(status, kind)
    return kinds


STATUS_KINDS = _status_kinds()


def kind_for_status(status: int) -> str:
    """The kind an HTTP status means, for errors that come from elsewhere (LiteLLM, Flask)."""
    return STATUS_KINDS.get(status) or ("invalid_request" if 400 <= status < 500 else "api_error")


def kind_of(exc: BaseException) -> tuple[str, int | None]:
    """(kind, explicit status) of an exception; a hook's `RequestRejected` names its own status."""
    if isinstance(exc, RequestRejected):
        return (exc.kind if exc.kind in KINDS else "api_error"), exc.status
    if isinstance(exc, MlxgateError):
        return exc.kind, None
    return "api_error", None


def error_body(api: str, kind: str, message: str, param: str | None = None, code: str | None = None) -> bytes:
    spec = KINDS.get(kind, KINDS["api_error"])
    if api == ANTHROPIC:
        body = {"type": "error", "error": {"type": spec.anthropic_type, "message": message}}
    elif api == OLLAMA:
        body = {"error": message}
    else:
        body = {"error": {"message": message, "type": spec.openai_type, "param": param,
                          "code": code or spec.openai_code}}
    return json.dumps(body).encode()


def error_response(api: str, kind: str, message: str, status: int | None = None,
                   retry_after: int = 5, param: str | None = None,
                   code: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of an error answer in `api`'s shape."""
    spec = KINDS.get(kind, KINDS["api_error"])
    if status is None:
        status = spec.openai_status if (api != ANTHROPIC and spec.openai_status) else spec.status
    body = error_body(api, kind, message, param, code)
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if spec.retry_after:
        headers.append(("retry-after", str(retry_after)))
    if spec.should_retry is not None:
        headers.append(("x-should-retry", "true" if spec.should_retry else "false"))
    return status, headers, body


def exception_response(api: str, exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
    kind, status = kind_of(exc)
    return error_response(api, kind, str(exc), status, getattr(exc, "retry_after", 5),
                          getattr(exc, "param", None), getattr(exc, "code", None))


def error_event(api: str, kind: str, message: str) -> bytes:
    """The error as the last event of a stream that has already started (a Responses
    stream whose translator is at hand ends with its `response.failed` instead)."""
    if api == RESPONSES:
        spec = KINDS.get(kind, KINDS["api_error"])
        event = {"type": "error", "code": spec.openai_code or spec.openai_type, "message": message,
                 "param": None, "sequence_number": 0}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    body = error_body(api, kind, message)
    if api == OLLAMA:  # NDJSON: the clients raise the line's `error`
        return body + b"\n"
    if api == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
