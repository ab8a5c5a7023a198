"""Error bodies in each API's own shape, so clients' SDKs raise the right exception."""

from __future__ import annotations

import json

# Our error kinds → (Anthropic error type, OpenAI error type, OpenAI code)
KINDS = {
    "invalid_request": ("invalid_request_error", "invalid_request_error", None),
    "authentication": ("authentication_error", "authentication_error", "invalid_api_key"),
    "permission": ("permission_error", "permission_error", None),
    "not_found": ("not_found_error", "invalid_request_error", "model_not_found"),
    "request_too_large": ("request_too_large", "invalid_request_error", "request_too_large"),
    "rate_limit": ("rate_limit_error", "rate_limit_error", None),
    "overloaded": ("overloaded_error", "server_error", "overloaded"),
    "unavailable": ("api_error", "server_error", "service_unavailable"),
    "api_error": ("api_error", "server_error", None),
}


# A hook's rejection travels through LiteLLM as an error whose type is this prefix + our kind;
# the front turns it back into the API's own error type.
KIND_PREFIX = "mlxgate:"


def is_anthropic_path(path: str) -> bool:
    return path.startswith(("/v1/messages", "/messages", "/anthropic"))


def error_body(anthropic: bool, kind: str, message: str) -> bytes:
    anthropic_type, openai_type, code = KINDS.get(kind, KINDS["api_error"])
    if anthropic:
        body = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    else:
        body = {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
    return json.dumps(body).encode()
