"""The edge: the ASGI app every client talks to, on the HTTP and HTTPS listeners.

Each request is taken once: the key (`x-api-key` or `Authorization: Bearer`, compared in
constant time), the size (`max_body`), the JSON body (parsed once), then the hooks, once
(`pipeline`). The hooks' target decides where it goes: a local model's request to the
wrapper's relay (`relay_client`), a `litellm:` deployment's to LiteLLM (`cloud`). Errors
found here are shaped by the one table (`api_errors`) in the client's API format; the
relay shapes its own. When the client disconnects, the request is cancelled, which
closes the connection to the relay, which stops the generation.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging

from ..api_errors import ANTHROPIC, OPENAI, error_response, exception_response, is_anthropic_path
from ..config import Config
from ..errors import MlxgateError
from ..hookspecs import LITELLM
from ..json_body import parse_object
from . import routes
from .model_list import models
from .pipeline import Hooks
from .relay_client import RelayClient

log = logging.getLogger("mlxgate.proxy")

KEY_HINT = ("invalid or missing API key: send it as `x-api-key` (Anthropic clients) or "
            "`Authorization: Bearer` (OpenAI clients); `mlxgate env` prints it")


class Edge:
    def __init__(self, config: Config, hooks: Hooks | None = None, relay: RelayClient | None = None,
                 cloud=None, stand_in: bool = False):
        self.config = config
        self.api_key = config.api_key.encode() if config.api_key else None
        self.stand_in = stand_in  # any credential from loopback passes (see `_stand_in_lets_in`)
        self.hooks = hooks or Hooks(config)
        self.relay = relay or RelayClient(config)
        self.cloud = cloud

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return None
        path = scope.get("path", "").rstrip("/") or "/"
        method = scope.get("method")
        api = ANTHROPIC if is_anthropic_path(path) else OPENAI  # until the route says
        if path in routes.OPEN_PATHS:
            return await _json(send, 200, b'{"status": "ok"}')
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and not (self._authorized(headers) or self._stand_in_lets_in(scope, headers)):
            return await _error(send, api, "authentication", KEY_HINT)

        route = routes.POST_ROUTES.get(path) if method == "POST" else None
        if route is None:
            if method == "GET" and path in routes.MODEL_LIST_PATHS:
                return await self._guarded(send, api, self._models(send))
            stored = routes.STORED_RESPONSE.match(path) if method in ("GET", "DELETE") else None
            if stored:
                query = scope.get("query_string", b"").decode("latin-1")
                call = self.relay.forward_stored(send, method, stored.group(1) + (f"?{query}" if query else ""))
                return await self._guarded(send, api, call)
            if self.cloud is not None:
                return await _until_disconnect(self.cloud.forward_raw(scope, receive, send), receive)
            return await _error(send, api, "not_found", f"no route {method} {path} here: mlxgate serves "
                                f"POST /v1/messages, /v1/messages/count_tokens, /v1/chat/completions, "
                                f"/v1/completions, /v1/responses, /v1/responses/input_tokens, "
                                f"GET and DELETE /v1/responses/ID and GET /v1/models")
        api = route.api
        body = await self._body(headers, receive, send, api)
        if body is None:
            return None
        try:
            data = parse_object(body)
        except ValueError as exc:
            return await _error(send, api, "invalid_request", str(exc))
        try:
            ctx = self.hooks.run(route.name, data)
        except MlxgateError as exc:
            return await _reply(send, *exception_response(api, exc))
        except Exception as exc:
            log.exception("a plugin failed on %s", route.name)
            return await _error(send, api, "api_error", f"a plugin failed: {type(exc).__name__}: {exc}")
        target = ctx.target
        if target.server == LITELLM:
            if self.cloud is None:
                return await _error(send, api, "not_found", f"model {target.model!r} names a LiteLLM deployment, "
                                    f"but the config's litellm: section lists none")
            call = self.cloud.forward(scope, ctx.data, send, api)
        else:
            call = self.relay.forward(send, api, target.server, route.relay_path, target.model, ctx.data)
        return await self._guarded(send, api, _until_disconnect(call, receive))

    async def _guarded(self, send, api: str, call) -> None:
        """Run `call`; an error it raises before answering becomes the API's error answer."""
        try:
            await call
        except MlxgateError as exc:
            await _reply(send, *exception_response(api, exc))

    async def _models(self, send) -> None:
        await _json(send, 200, json.dumps(await models(self.config, self.relay)).encode())

    async def _body(self, headers: dict, receive, send, api: str) -> bytes | None:
        """The whole body, or None once an answer (413) was sent or the client left."""
        limit = self.config.max_body
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            await _error(send, api, "request_too_large", f"request body of {length} bytes is over the limit of {limit}")
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _error(send, api, "request_too_large", f"request body is over the limit of {limit} bytes")
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _authorized(self, headers: dict) -> bool:
        return hmac.compare_digest(_credential(headers).encode(), self.api_key)

    # ---- standing in for ssl_domain (stand_in_any_key): the real service's clients send
    # their own API key or OAuth token; on the HTTPS listener, from this machine only, any
    # credential is let in. The HTTP listener and other addresses keep the gateway's key.
    def _stand_in_lets_in(self, scope, headers: dict) -> bool:
        return self.stand_in and _loopback(scope.get("client")) and bool(_credential(headers))

    async def _lifespan(self, scope, receive, send) -> None:
        if self.cloud is not None:  # LiteLLM loads its deployments at startup
            return await self.cloud.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.relay.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _credential(headers: dict) -> str:
    """The key a client sent: `x-api-key`, else `Authorization: Bearer`."""
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given


def _loopback(client) -> bool:
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except (TypeError, IndexError, ValueError):
        return False


async def _until_disconnect(call, receive) -> None:
    """Run `call`; cancel it as soon as the client disconnects (the body is already read,
    so `receive` has nothing else to say)."""
    task = asyncio.ensure_future(call)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
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


async def _reply(send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})


async def _error(send, api: str, kind: str, message: str) -> None:
    await _reply(send, *error_response(api, kind, message))


async def _json(send, status: int, payload: bytes) -> None:
    await _reply(send, status, [("content-type", "application/json"), ("content-length", str(len(payload)))],
                 payload)


def build(config: Config, https: bool = False) -> Edge:
    """The edge as the proxy program runs it: LiteLLM loaded only for a `litellm:` section."""
    from . import litellm_config

    cloud = None
    if litellm_config.enabled(config):
        from .cloud import Cloud
        cloud = Cloud(config)
    stand_in = https and bool(config.ssl_domain) and config.stand_in_any_key
    return Edge(config, cloud=cloud, stand_in=stand_in)

