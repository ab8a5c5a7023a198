"""ASGI middleware in front of the LiteLLM app: auth, body checks, error shapes.

- Every route but the liveness probes needs the API key (`x-api-key` or
  `Authorization: Bearer`), compared in constant time; LiteLLM's own answers to a
  wrong key are confusing ("No connected db").
- A JSON body must parse and be an object, and stay under `max_body` bytes.
- Any error answer leaves in the API's own shape: Anthropic's
  `{"type": "error", "error": {...}}` on `/v1/messages`, OpenAI's `{"error": {...}}`
  elsewhere.
- `count_tokens` and `/v1/models` are answered here (`local_routes`).
- When the client disconnects, the request is cancelled inside the proxy, which
  closes its connection to the relay, which stops the generation. LiteLLM alone does
  not do this for `/v1/messages` streams nor for non-streamed requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re

from ..api_errors import KIND_PREFIX, KINDS, error_body, is_anthropic_path
from ..errors import RequestRejected
from ..json_body import parse_object
from . import local_routes

OPEN_PATHS = ("/health/liveliness", "/health/liveness", "/health/readiness")
STATUS_KINDS = {400: "invalid_request", 401: "authentication", 403: "permission", 404: "not_found",
                413: "request_too_large", 422: "invalid_request", 429: "rate_limit", 503: "unavailable",
                529: "overloaded"}
# the status that goes with a kind found inside a wrapped error (LiteLLM may report another)
KIND_STATUS = {"invalid_request": 400, "not_found": 404, "request_too_large": 413, "unavailable": 503,
               "authentication": 401}


class GatewayFront:
    def __init__(self, app, api_key: str | None, max_body: int = 32 * 1024 * 1024, config=None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        anthropic = is_anthropic_path(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        if self.api_key and not path.startswith(OPEN_PATHS) and not self._authorized(headers):
            return await _reply(send, 401, anthropic, "authentication",
                                "invalid or missing API key: send it as `x-api-key` (Anthropic clients) or "
                                "`Authorization: Bearer` (OpenAI clients); `mlxgate env` prints it")

        body, data = b"", None
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > self.max_body:
                return await _reply(send, 413, anthropic, "request_too_large",
                                    f"request body of {length} bytes is over the limit of {self.max_body}")
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await _reply(send, 413, anthropic, "request_too_large",
                                        f"request body is over the limit of {self.max_body} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            content_type = headers.get("content-type", "")
            if "multipart" not in content_type:  # these APIs take JSON, whatever the client labels it
                try:
                    data = parse_object(body)
                except ValueError as exc:
                    return await _reply(send, 400, anthropic, "invalid_request", str(exc))
                if "json" not in content_type:  # e.g. curl -d without -H: let LiteLLM read it as JSON
                    scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                                 + [(b"content-type", b"application/json")])
        local = await self._local(scope, path, data, anthropic, send)
        if local is not False:
            return local
        app_receive, gone = _split_receive(body, receive)
        shaper = _ErrorShaper(send, anthropic)

        async def app_send(message):
            await shaper(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                gone.set()  # like the server's own receive: after the answer, only a disconnect
        return await _until_disconnect(self.app(scope, app_receive, app_send), receive, gone)

    async def _local(self, scope, path: str, data: dict | None, anthropic: bool, send):
        """Answer our own routes; False when the request is for LiteLLM."""
        if self.config is None:
            return False
        method = scope.get("method")
        try:
            if method == "POST" and data is not None and path.rstrip("/") == local_routes.COUNT_TOKENS:
                status, payload = await local_routes.count_tokens(self.config, data)
                if status >= 400:
                    kind, text = _parse_error(payload, status)
                    return await _reply(send, status, True, kind, text)
                return await _json(send, 200, payload)
            if method == "GET" and path.rstrip("/") in local_routes.MODELS:
                return await _json(send, 200, json.dumps(await local_routes.models(self.config)).encode())
        except RequestRejected as exc:
            return await _reply(send, exc.status, anthropic, exc.kind, str(exc))
        return False

    def _authorized(self, headers: dict) -> bool:
        given = headers.get("x-api-key") or ""
        auth = headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.api_key)


def _split_receive(body: bytes, receive):
    """(the app's receive, an event set on disconnect): the app gets the body we already
    read, then waits for the disconnect our watcher sees on the real `receive`."""
    gone = asyncio.Event()
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}
    return replay, gone  # set on disconnect or once the answer is sent


async def _until_disconnect(call, receive, gone: asyncio.Event) -> None:
    """Run the app; cancel it as soon as the client disconnects."""
    task = asyncio.ensure_future(call)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not watcher.done():
                raise
    finally:
        watcher.cancel()


async def _json(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def _reply(send, status: int, anthropic: bool, kind: str, message: str) -> None:
    payload = error_body(anthropic, kind, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class _ErrorShaper:
    """Rewrites error answers (status >= 400, JSON) into the API's own shape."""

    def __init__(self, send, anthropic: bool):
        self.send = send
        self.anthropic = anthropic
        self.status = 200
        self.start = None
        self.buffer = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status < 400:
                return await self.send(message)
            self.start = message
            return None
        if message["type"] == "http.response.body" and self.start is not None:
            self.buffer.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            return await self._flush(b"".join(self.buffer))
        return await self.send(message)

    async def _flush(self, raw: bytes) -> None:
        kind, text = _parse_error(raw, self.status)
        status = KIND_STATUS.get(kind, self.status)
        if kind == "overloaded":
            status = 529 if self.anthropic else 503
        payload = error_body(self.anthropic, kind, text)
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k.lower() not in (b"content-length", b"content-type", b"retry-after")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status in (429, 503, 529):
            headers.append((b"retry-after", b"5"))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": payload})


def _parse_error(raw: bytes, status: int) -> tuple[str, str]:
    """Our kind and the message of an upstream error body."""
    kind = STATUS_KINDS.get(status, "api_error")
    try:
        data = json.loads(raw)
    except ValueError:
        return kind, raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else data
    if isinstance(error, dict):
        marked = str(error.get("type", ""))
        if marked.startswith(KIND_PREFIX) and marked[len(KIND_PREFIX):] in KINDS:
            kind = marked[len(KIND_PREFIX):]
        message = error.get("message") or error.get("error")
        if isinstance(message, str):
            return _unwrap(kind, message)
    elif isinstance(error, str):
        return _unwrap(kind, error)
    return kind, json.dumps(data)[:500]


_TYPE_KINDS = {types[0]: kind for kind, types in KINDS.items()}  # Anthropic's names are unique
_TYPE_KINDS.update({t[1]: k for k, t in KINDS.items() if t[1] not in _TYPE_KINDS and t[2] is None})
_LITELLM_PREFIX = re.compile(r"^(?:(?:litellm\.)?\w+(?:Error|Exception)(?::| -) *)+")


def _unwrap(kind: str, message: str) -> tuple[str, str]:
    """The relay's own error inside LiteLLM's wrapping ("litellm.BadRequestError: OpenAIException
    - {...}\n\nLiteLLM: model group ..."), so clients read what the model server side said."""
    start = message.find("{")
    if start >= 0:
        try:
            inner, _ = json.JSONDecoder().raw_decode(message[start:])
        except ValueError:
            inner = None
        error = inner.get("error") if isinstance(inner, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _TYPE_KINDS.get(error.get("type"), kind), error["message"]
    message = _LITELLM_PREFIX.sub("", message)
    return kind, message.split("\nmodel=")[0].split("\n\nLiteLLM:")[0].strip()
