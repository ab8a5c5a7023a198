"""The edge: the ASGI app every client talks to, on the HTTP and HTTPS listeners.

Each request is taken once: the key (`x-api-key` or `Authorization: Bearer`, compared in
constant time), the size (`max_body`), the JSON body (parsed once), then the hooks, once
(`pipeline`). The hooks' target decides where it goes: a local model's request to the
wrapper's relay (`relay_client`), a `litellm:` deployment's to LiteLLM (`cloud`). Errors
found here are shaped by the one table (`api_errors`) in the client's API format; the
relay shapes its own. When the client disconnects, the request is cancelled, which
closes the connection to the relay, which stops the generation.

Where a request goes is the route table's (`route_table`); the status page and its login
are the browser's (`browser`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from ..api_errors import OLLAMA, exception_response, kind_for_status, kind_of
from ..api_paths import family_of
from ..config import Config
from ..credentials import credential, is_key
from ..errors import MlxgateError
from ..json_body import parse_object
from ..relay_protocol import CLIENT_HEADERS, REQUESTED_HEADER
from ..usage import Record, client_name
from . import route_table, routes
from .asgi import Request, error, json_reply, reply
from .browser import Browser
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
        self.api_key = config.api_key.encode() if config.api_key else None  # None: the gateway is open
        self.stand_in = stand_in  # any credential from loopback passes (see `_stand_in_lets_in`)
        self.hooks = hooks or Hooks(config)
        self.relay = relay or RelayClient(config)
        self.cloud = cloud
        self.hosts = hosts  # `HostRouting` when the config lists other machines
        self.records = RecordSender(self.relay.post_bytes, enabled=config.record_usage)
        self.browser = Browser(self.api_key, self.relay, litellm_ui=cloud is not None)
        self.table = route_table.edge_table(self, self.browser)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return None
        request = Request.of(scope, receive, send)
        row = self.table.find(request)
        if row.keyed and not (self._authorized(request.headers) or self._stand_in_lets_in(request)):
            if row.route is not None:
                self.records.add(Record(api=family_of(request.api), route=row.route.name, status=401,
                                        error="authentication", client=_client(request.headers)))
            return await error(send, request.api, "authentication", KEY_HINT)
        return await row.handler(request)

    # ------------------------------------------------------------------ the route table's handlers
    async def healthy(self, request: Request) -> None:
        await json_reply(request.send, 200, b'{"status": "ok"}')

    async def api_request(self, request: Request) -> None:
        await self.answer(request, family_of(request.api))

    async def model_list(self, request: Request) -> None:
        await self._guarded(request.send, request.api, self._models(request.send))

    async def metrics(self, request: Request) -> None:
        await self._guarded(request.send, request.api, self._metrics(request.send))

    async def stored(self, request: Request) -> None:
        """A stored response (GET, DELETE): the wrapper keeps them; no model, no hooks."""
        query = request.scope.get("query_string", b"").decode("latin-1")
        call = self.relay.forward_stored(request.send, request.method,
                                         request.match.group(1) + (f"?{query}" if query else ""))
        await self._guarded(request.send, request.api, call)

    async def elsewhere(self, request: Request) -> None:
        """Any other path: LiteLLM's own routes when it is loaded, else the 404."""
        if self.cloud is not None:  # its master key opens its admin routes: the gateway's key, never stand-in
            if not self._authorized(request.headers):
                return await error(request.send, request.api, "authentication", KEY_HINT)
            return await self.cloud.forward_raw(request.scope, request.receive, request.send)
        return await error(request.send, request.api, "not_found",
                           f"no route {request.method} {request.path} here: mlxgate serves {self.table.served()}")

    async def answer(self, request: Request, family: str) -> None:
        """Answer one API request (its key already checked) of `request.route`, in `request.api`'s
        shape, recorded under the API `family`; the Ollama listener's requests come here too."""
        route, headers = request.route, request.headers
        record = Record(api=family, route=route.name, client=_client(headers))
        tracked = _Tracked(request.send)
        started = time.perf_counter()
        mine = True
        try:
            mine = await self._request(request.scope, request.receive, tracked, route, request.api, headers,
                                       record)
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
            await error(send, api, "invalid_request", str(exc))
            return True
        record.requested_model = str(data.get("model") or "")[:256]
        record.stream = data.get("stream", api == OLLAMA) is True  # Ollama's stream unless it says not
        try:
            ctx = self.hooks.run(route.name, data)
        except MlxgateError as exc:
            record.error = kind_of(exc)[0]
            await reply(send, *exception_response(api, exc))
            return True
        except Exception as exc:
            log.exception("a plugin failed on %s", route.name)
            record.error = "api_error"
            await error(send, api, "api_error", f"a plugin failed ({type(exc).__name__}) on route "
                         f"{route.name}; `mlxgate logs proxy` has the traceback")
            return True
        target = ctx.target
        record.served_model, record.server = target.model, target.via
        if not target.local:
            if self.cloud is None or not route.cloud:
                record.error = "not_found"
                await error(send, api, "not_found", f"model {target.model!r} names a LiteLLM deployment, " + (
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
            await reply(send, *exception_response(api, exc))
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
            await reply(send, *exception_response(api, exc))

    async def _metrics(self, send) -> None:
        text = await self.relay.get_bytes(routes.METRICS_PATH)
        await reply(send, 200, [("content-type", "text/plain; version=0.0.4; charset=utf-8"),
                                ("content-length", str(len(text)))], text)

    async def _models(self, send) -> None:
        hosted = self.hosts.model_names() if self.hosts is not None else ()
        await json_reply(send, 200, json.dumps(await models(self.config, self.relay, hosted)).encode())

    async def _body(self, headers: dict, receive, send, api: str) -> bytes | None:
        """The whole body, or None once an answer (413) was sent or the client left."""
        limit = self.config.max_body
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            await error(send, api, "request_too_large", f"request body of {length} bytes is over the limit of {limit}")
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await error(send, api, "request_too_large", f"request body is over the limit of {limit} bytes")
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _authorized(self, headers: dict) -> bool:
        return self.api_key is None or is_key(credential(headers), self.api_key)

    # ---- standing in for ssl_domain (stand_in_any_key): the real service's clients send
    # their own API key or OAuth token; on the HTTPS listener, from this machine only, any
    # credential is let in. The HTTP listener and other addresses keep the gateway's key.
    def _stand_in_lets_in(self, request: Request) -> bool:
        return self.stand_in and request.loopback and bool(credential(request.headers))

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


def _client(headers: dict) -> str:
    return client_name(headers.get("user-agent"), headers.get("originator"))


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

