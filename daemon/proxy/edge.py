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
import http.cookies
import ipaddress
import json
import logging
import time
import urllib.parse

from ..api_errors import ANTHROPIC, OLLAMA, OPENAI, error_response, exception_response, is_anthropic_path, kind_for_status, kind_of
from ..config import Config
from ..credentials import credential, is_key
from ..errors import MlxgateError
from ..json_body import parse_object
from ..relay_protocol import CLIENT_HEADERS, REQUESTED_HEADER
from ..usage import Record, client_name
from . import routes, status_page
from .model_list import models
from .pipeline import Hooks
from .records import RecordSender
from .relay_client import RelayClient
from .usage_sniffer import UsageSniffer

log = logging.getLogger("mlxgate.proxy")

KEY_HINT = ("invalid or missing API key: send it as `x-api-key` (Anthropic clients) or "
            "`Authorization: Bearer` (OpenAI clients); `mlxgate env` prints it")


class Edge:
    def __init__(self, config: Config, hooks: Hooks | None = None, relay: RelayClient | None = None,
                 cloud=None, stand_in: bool = False, hosts=None):
        self.config = config
        self.api_key = config.api_key.encode() if config.api_key else None
        self.stand_in = stand_in  # any credential from loopback passes (see `_stand_in_lets_in`)
        self.hooks = hooks or Hooks(config)
        self.relay = relay or RelayClient(config)
        self.cloud = cloud
        self.hosts = hosts  # `HostRouting` when the config lists other machines
        self.records = RecordSender(self.relay.post_bytes, enabled=config.record_usage)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return None
        path = scope.get("path", "").rstrip("/") or "/"
        method = scope.get("method")
        api = ANTHROPIC if is_anthropic_path(path) else OPENAI  # the family; a route says its error shape
        if path in routes.OPEN_PATHS:
            return await _json(send, 200, b'{"status": "ok"}')
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if method == "GET" and (path == "/" or path.startswith("/static/")):
            return await self._page(scope, path, headers, send)
        if path == "/login":
            return await self._login(scope, method, receive, send)
        route = routes.POST_ROUTES.get(path) if method == "POST" else None
        if self.api_key and not (self._authorized(headers) or self._stand_in_lets_in(scope, headers)):
            if route is not None:
                self.records.add(Record(api=api, route=route.name, status=401, error="authentication",
                                        client=client_name(headers.get("user-agent"), headers.get("originator"))))
            return await _error(send, api, "authentication", KEY_HINT)
        if route is None:
            if method == "GET" and path in routes.MODEL_LIST_PATHS:
                return await self._guarded(send, api, self._models(send))
            if method == "GET" and path == routes.METRICS_PATH:
                return await self._guarded(send, api, self._metrics(send))
            stored = routes.STORED_RESPONSE.match(path) if method in ("GET", "DELETE") else None
            if stored:
                query = scope.get("query_string", b"").decode("latin-1")
                call = self.relay.forward_stored(send, method, stored.group(1) + (f"?{query}" if query else ""))
                return await self._guarded(send, api, call)
            if self.cloud is not None:  # LiteLLM's own routes: it reads the body, and its master key opens
                if not self._authorized(headers):  # its admin routes: the gateway's key, never stand-in
                    return await _error(send, api, "authentication", KEY_HINT)
                return await self.cloud.forward_raw(scope, receive, send)
            return await _error(send, api, "not_found", f"no route {method} {path} here: mlxgate serves "
                                f"POST /v1/messages, /v1/messages/count_tokens, /v1/chat/completions, "
                                f"/v1/completions, /v1/responses, /v1/responses/input_tokens, /v1/embeddings, /v1/rerank, "
                                f"GET and DELETE /v1/responses/ID and GET /v1/models, /metrics, /")
        return await self.answer(scope, receive, send, route, headers, api)

    async def answer(self, scope, receive, send, route: routes.Route, headers: dict, family: str) -> None:
        """Answer one API request of `route` (its key already checked), recorded under the API
        `family`; the Ollama listener's requests come here too."""
        record = Record(api=family, route=route.name, client=client_name(headers.get("user-agent"),
                                                                            headers.get("originator")))
        tracked = _Tracked(send)
        started = time.perf_counter()
        mine = True
        try:
            mine = await self._request(scope, receive, tracked, route, route.api, headers, record)
        except asyncio.CancelledError:
            record.cancelled = True
            mine = record.server != "relay"
            raise
        finally:
            if mine:  # the relay records what it answered; the rest is recorded here
                record.status, record.total_ms = tracked.status, (time.perf_counter() - started) * 1000
                if record.status >= 400 and not record.error:
                    record.error = kind_for_status(record.status)
                tracked.usage.fill(record)
                self.records.add(record)
        return None

    async def _request(self, scope, receive, send, route: routes.Route, api: str, headers: dict,
                       record: Record) -> bool:
        """Answer one API request; False when the relay answered it (and so recorded it)."""
        body = await self._body(headers, receive, send, api)
        if body is None:
            record.cancelled = send.status == 0
            return True
        try:
            data = parse_object(body)
        except ValueError as exc:
            record.error = "invalid_request"
            await _error(send, api, "invalid_request", str(exc))
            return True
        record.requested_model = str(data.get("model") or "")[:256]
        record.stream = data.get("stream", api == OLLAMA) is True  # Ollama's stream unless it says not
        try:
            ctx = self.hooks.run(route.name, data)
        except MlxgateError as exc:
            record.error = kind_of(exc)[0]
            await _reply(send, *exception_response(api, exc))
            return True
        except Exception as exc:
            log.exception("a plugin failed on %s", route.name)
            record.error = "api_error"
            await _error(send, api, "api_error", f"a plugin failed ({type(exc).__name__}) on route "
                         f"{route.name}; `mlxgate logs proxy` has the traceback")
            return True
        target = ctx.target
        record.served_model, record.server = target.model, target.via
        if not target.local:
            if self.cloud is None or not route.cloud:
                record.error = "not_found"
                await _error(send, api, "not_found", f"model {target.model!r} names a LiteLLM deployment, " + (
                    "but the config's litellm: section lists none" if route.cloud else
                    "which Ollama's API does not reach (it serves local models); send the request to the "
                    "gateway's own port, in the Anthropic or OpenAI API"))
                return True
            send.usage.watch()
            await self._guarded(send, api, _until_disconnect(self.cloud.forward(scope, ctx.data, send, api),
                                                             receive), record)
            return True
        client = {name: headers[name] for name in CLIENT_HEADERS if name in headers}
        client[REQUESTED_HEADER] = record.requested_model
        record.server = "relay"  # from here on, the relay makes the record (unless it is not there)
        if self.hosts is not None:  # several machines: the best place for it (see `hosts`)
            call = self.hosts.forward(send, api, target, route.name, route.relay_path, ctx.data, client)
        else:
            call = self.relay.forward(send, api, route.relay_path, target.model, ctx.data, client)
        try:
            complete = await _until_disconnect(call, receive)
        except MlxgateError as exc:
            record.server, record.error = target.via, kind_of(exc)[0]
            await _reply(send, *exception_response(api, exc))
            return True
        if complete is False:  # the relay (or the host) went away mid-answer, its record with it
            record.server, record.error = target.via, "backend_error"
            return True
        return False

    async def _guarded(self, send, api: str, call, record: Record | None = None) -> None:
        """Run `call`; an error it raises before answering becomes the API's error answer."""
        try:
            await call
        except MlxgateError as exc:
            if record is not None:
                record.error = kind_of(exc)[0]
            await _reply(send, *exception_response(api, exc))

    async def _metrics(self, send) -> None:
        text = await self.relay.get_bytes(routes.METRICS_PATH)
        await _reply(send, 200, [("content-type", "text/plain; version=0.0.4; charset=utf-8"),
                                 ("content-length", str(len(text)))], text)

    # ------------------------------------------------------------------ the status page
    def _may_see_page(self, scope, headers: dict) -> bool:
        if _loopback(scope.get("client")) or not self.api_key:
            return True
        cookie = http.cookies.SimpleCookie(headers.get("cookie", ""))
        given = cookie[status_page.COOKIE].value if status_page.COOKIE in cookie else credential(headers)
        return is_key(given, self.api_key)

    async def _page(self, scope, path: str, headers: dict, send) -> None:
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            kind = status_page.STATIC_FILES.get(name)
            if kind is None:
                return await _error(send, OPENAI, "not_found", f"no file {name!r}")
            data = status_page.static_file(name)
            return await _reply(send, 200, [("content-type", kind), ("content-length", str(len(data))),
                                            ("cache-control", "max-age=86400")], data)
        if not self._may_see_page(scope, headers):
            return await _reply(send, 303, [("location", "/login"), ("content-length", "0")], b"")
        try:
            data = await self.relay.get_json("/status")
        except MlxgateError as exc:
            data = {"servers": {}, "error": str(exc)}
        links = {"metrics": routes.METRICS_PATH, "models": "/v1/models"}
        if self.cloud is not None:
            links["LiteLLM UI"] = "/ui"
        page = status_page.render(data, links).encode()
        await _reply(send, 200, [("content-type", "text/html; charset=utf-8"), ("content-length", str(len(page)))],
                     page)

    async def _login(self, scope, method: str, receive, send) -> None:
        problem = ""
        if method == "POST":
            body = b""
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False) and len(body) < 4096
            given = (urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
            if self.api_key is None or is_key(given, self.api_key):
                cookie = f"{status_page.COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
                if scope.get("scheme") == "https":
                    cookie += "; Secure"
                return await _reply(send, 303, [("location", "/"), ("set-cookie", cookie),
                                                ("content-length", "0")], b"")
            problem = "That is not the gateway's key."
        page = status_page.login_page(problem).encode()
        await _reply(send, 401 if problem else 200, [("content-type", "text/html; charset=utf-8"),
                                                     ("content-length", str(len(page)))], page)

    async def _models(self, send) -> None:
        hosted = self.hosts.model_names() if self.hosts is not None else ()
        await _json(send, 200, json.dumps(await models(self.config, self.relay, hosted)).encode())

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
        return is_key(credential(headers), self.api_key)

    # ---- standing in for ssl_domain (stand_in_any_key): the real service's clients send
    # their own API key or OAuth token; on the HTTPS listener, from this machine only, any
    # credential is let in. The HTTP listener and other addresses keep the gateway's key.
    def _stand_in_lets_in(self, scope, headers: dict) -> bool:
        return self.stand_in and _loopback(scope.get("client")) and bool(credential(headers))

    async def _lifespan(self, scope, receive, send) -> None:
        if self.cloud is not None:  # LiteLLM loads its deployments at startup
            return await self.cloud.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.records.flush()
                if self.hosts is not None:
                    await self.hosts.close()
                await self.relay.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _loopback(client) -> bool:
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except (TypeError, IndexError, ValueError):
        return False


class _Tracked:
    """The client's `send`, noting the status of the answer and (for LiteLLM's) its usage."""

    def __init__(self, send):
        self.send = send
        self.status = 0
        self.usage = UsageSniffer()

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.usage.feed(message.get("body", b""))
        await self.send(message)


async def _until_disconnect(call, receive):
    """Run `call` and return what it returns; cancel it as soon as the client disconnects
    (None then: the body is already read, so `receive` has nothing else to say)."""
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
            return await task
        except asyncio.CancelledError:
            if not watcher.done():
                raise
            return None
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
    relay, hosts = RelayClient(config), None
    if config.hosts:
        from .hosts import HostRouting
        hosts = HostRouting(config, relay)
    return Edge(config, relay=relay, cloud=cloud, stand_in=stand_in, hosts=hosts)

